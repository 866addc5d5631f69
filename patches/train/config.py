"""Training configuration: one dataclass, every field with a default and help text."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from patches.device import resolve_device
from patches.stack import Placement


class InitMode(StrEnum):
    """How the patch rows start: copied from the embeddings of an instruction, or random."""

    text = "text"
    random = "random"


class BenignLoss(StrEnum):
    """Stage 1 loss on benign prompts: cross-entropy on the base model's greedy answer, or KL divergence
    from the bare model's full next-token distribution along that answer (distillation: "change nothing")."""

    ce = "ce"
    kl = "kl"


class Reference(StrEnum):
    """DPO's reference policy: the stage-1 (SFT) patch, or the bare model with no patch."""

    sft = "sft"
    bare = "bare"


class DpoPairs(StrEnum):
    """Which training prompts DPO learns from (:mod:`patches.train.pairs`): all, or the stage-1 patch's mistakes."""

    all = "all"
    mined = "mined"


_REPO = Path(__file__).resolve().parents[2]
PROJECT_DATA = _REPO / "patches" / "data"  # prompts written for this project
SHARED_DATA = _REPO.parent / "shared" / "data"  # the workplace's licensed prompt sets, when present


TASK_DOMAINS = {"refusal": "harmful-requests", "detox": "toxicity", "fairness": "gender-bias"}
"""What each task's patch guards against: the ``domain`` its files carry unless ``--domain`` says otherwise."""


def default_prompt_files(kind: str) -> list[Path]:
    """The default training files of a class (``harmful`` or ``benign``): shared sets plus project-written ones."""
    shared = {"harmful": SHARED_DATA / "harmful_train.jsonl", "benign": SHARED_DATA / "benign_train.txt"}[kind]
    return ([shared] if shared.is_file() else []) + sorted(PROJECT_DATA.glob(f"{kind}_*.txt"))


@dataclass
class TrainConfig:
    """Everything ``patchserve train`` needs; see each field's ``help``."""

    name: str = field(default="refusal", metadata={"help": "Patch name"})
    version: int = field(default=1, metadata={"help": "Patch version"})
    model: Path | None = field(default=None, metadata={"help": "Base model dir (default: the embedded model)"})
    harmful: list[Path] = field(default_factory=list, metadata={"help": "Files of prompts to refuse"})
    benign: list[Path] = field(default_factory=list, metadata={"help": "Files of prompts to answer"})
    teacher: str = field(
        default="policy",
        metadata={
            "help": "'policy' (base model's own answers + written refusals), 'policy-short' (refusals without the "
            "closing offer of other help) or a local model dir"
        },
    )
    n_tokens: int = field(default=50, metadata={"help": "Virtual tokens in the patch"})
    placement: Placement = field(
        default=Placement.prefix,
        metadata={"help": "Rows before the prompt ('prefix') or after it, directly before the reply ('suffix')"},
    )
    benign_loss: BenignLoss = field(
        default=BenignLoss.ce, metadata={"help": "Stage 1 loss on benign prompts: 'ce' or 'kl' (to the bare model)"}
    )
    init: InitMode = field(default=InitMode.text, metadata={"help": "Row initialisation"})
    init_text: str | None = field(default=None, metadata={"help": "Instruction for text init (default: built-in)"})
    init_from: Path | None = field(
        default=None, metadata={"help": "Start from this patch file's rows (continue a patch; replaces --init)"}
    )
    stack_with: list[Path] = field(
        default_factory=list,
        metadata={
            "help": "Frozen patch files laid out before this one, in serving order: a pass in the stack it will "
            "serve in (each in its own placement's segment, patches of one placement split by the separator)"
        },
    )
    holdout: float = field(default=0.2, metadata={"help": "Share of prompts kept out of training (by hash)"})
    max_prompts: int | None = field(default=None, metadata={"help": "Cap per class after the split (quick runs)"})
    response_tokens: int = field(default=40, metadata={"help": "Teacher responses are cut to this many tokens"})
    refusal_tokens: int = field(
        default=0,
        metadata={
            "help": "Harmful prompts' target refusals are cut to this many tokens in SFT and DPO (0: as "
            "--response-tokens); 64 keeps a written refusal whole, end of turn included, so the patch learns to stop"
        },
    )
    benign_repeat: int = field(default=2, metadata={"help": "Times each benign example appears per SFT epoch"})
    harmful_repeat: int = field(default=1, metadata={"help": "Times each harmful example appears per SFT epoch"})
    sft_epochs: float = field(default=1.0, metadata={"help": "Stage 1 epochs"})
    sft_lr: float = field(default=3e-3, metadata={"help": "Stage 1 learning rate (AdamW)"})
    dpo_epochs: float = field(default=1.0, metadata={"help": "Stage 2 epochs (0 skips DPO)"})
    dpo_lr: float = field(default=5e-4, metadata={"help": "Stage 2 learning rate (AdamW)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta: higher keeps closer to the reference"})
    reference: Reference = field(default=Reference.sft, metadata={"help": "DPO reference policy"})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the chosen answers' NLL added to DPO (RPO)"})
    dpo_pairs: DpoPairs = field(
        default=DpoPairs.all,
        metadata={"help": "Stage 2 pairs: 'all' training prompts, or 'mined' from the stage-1 patch's mistakes"},
    )
    dpo_anchors: float = field(
        default=1.0, metadata={"help": "mined: pairs the stage-1 patch already gets right, kept per mined pair"}
    )
    dpo_harmful_repeat: int = field(
        default=1, metadata={"help": "mined: times each harmful prompt the stage-1 patch answered appears in DPO"}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per optimiser step"})
    seed: int = field(default=0, metadata={"help": "Seed of data order, init and noise"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    bf16: bool = field(
        default=True,
        metadata={"help": "bfloat16: autocast on CPU (about 1.8x faster with AVX512-BF16), bf16 weights on CUDA"},
    )
    device: str = field(
        default="auto", metadata={"help": "'auto' (cuda if available), 'cpu' or 'cuda'; resolved on construction"}
    )
    work_dir: Path = field(default=Path("var/train"), metadata={"help": "Checkpoints and cached teacher answers"})
    out: Path | None = field(
        default=None, metadata={"help": "Patch file to write (default: <work_dir>/<name>-v<version>.safetensors)"}
    )
    key: Path | None = field(default=None, metadata={"help": "Ed25519 private key to sign the patch with"})
    description: str = field(default="", metadata={"help": "Patch description"})
    domain: str = field(
        default="", metadata={"help": "Patch domain, what it guards against (default: the task's, TASK_DOMAINS)"}
    )
    # --task detox (patches/train/detox.py): continuation prompts, sampled teacher; checked by detox_checks()
    task: str = field(default="refusal", metadata={"help": "'refusal' (harmful/benign prompts), 'detox' or 'fairness'"})
    continuations: list[Path] = field(
        default_factory=list, metadata={"help": "detox: files of openings to continue (default: RealToxicityPrompts)"}
    )
    samples: int = field(default=8, metadata={"help": "detox: continuations sampled per opening (k)"})
    continuation_tokens: int = field(default=32, metadata={"help": "detox: tokens per sampled continuation"})
    sample_temperature: float = field(default=1.0, metadata={"help": "detox: sampling temperature"})
    detox_margin: float = field(
        default=0.1, metadata={"help": "detox: least score gap between chosen and rejected for a DPO pair"}
    )
    ban_words: int = field(
        default=0,
        metadata={
            "help": "detox: sample the chosen side again with the scorer's N most offensive words banned "
            "(clean by construction, otherwise the model's own); 0 = choose among the free samples"
        },
    )
    min_tokens: int = field(default=4, metadata={"help": "detox: a chosen continuation has at least this many tokens"})
    # --task fairness (patches/train/fairness.py): the bias templates; --holdout splits them by template
    fairness_benign: int = field(
        default=300, metadata={"help": "fairness: benign prompts (refusal task's files) kept close to the bare model"}
    )

    def detox_checks(self) -> None:
        """The ``--task detox`` fields' checks (``refusal`` ignores them)."""
        checks = [
            (self.task in ("refusal", "detox", "fairness"), "task", self.task),
            (self.fairness_benign >= 0, "fairness_benign", self.fairness_benign),
            (self.samples >= 2, "samples", self.samples),
            (self.ban_words >= 0, "ban_words", self.ban_words),
            (self.continuation_tokens >= 4, "continuation_tokens", self.continuation_tokens),
            (self.sample_temperature > 0, "sample_temperature", self.sample_temperature),
            (0 <= self.detox_margin <= 1, "detox_margin", self.detox_margin),
            (1 <= self.min_tokens <= self.continuation_tokens, "min_tokens", self.min_tokens),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ValueError(f"invalid training config: {name}={value!r}")

    @property
    def refusal_cap(self) -> int:
        """Tokens a harmful prompt's target refusal is cut to: ``refusal_tokens``, else ``response_tokens``."""
        return self.refusal_tokens or self.response_tokens

    @property
    def patch_domain(self) -> str:
        """The ``domain`` the trained file carries: ``domain`` when set, else the task's."""
        return self.domain or TASK_DOMAINS[self.task]

    def __post_init__(self) -> None:
        self.init = InitMode(self.init)
        self.reference = Reference(self.reference)
        self.dpo_pairs = DpoPairs(self.dpo_pairs)
        self.placement = Placement(self.placement)
        self.benign_loss = BenignLoss(self.benign_loss)
        self.harmful = self.harmful or default_prompt_files("harmful")
        self.benign = self.benign or default_prompt_files("benign")
        checks = [
            (self.n_tokens >= 1, "n_tokens", self.n_tokens),
            (0 <= self.holdout < 1, "holdout", self.holdout),
            (self.sft_epochs >= 0 and self.dpo_epochs >= 0, "epochs", (self.sft_epochs, self.dpo_epochs)),
            (self.sft_epochs + self.dpo_epochs > 0, "epochs", "both zero"),
            (self.beta > 0, "beta", self.beta),
            (self.dpo_anchors >= 0, "dpo_anchors", self.dpo_anchors),
            (self.batch_size >= 1, "batch_size", self.batch_size),
            (self.benign_repeat >= 1, "benign_repeat", self.benign_repeat),
            (self.harmful_repeat >= 1, "harmful_repeat", self.harmful_repeat),
            (self.dpo_harmful_repeat >= 1, "dpo_harmful_repeat", self.dpo_harmful_repeat),
            (self.response_tokens >= 4, "response_tokens", self.response_tokens),
            (self.refusal_tokens == 0 or self.refusal_tokens >= 4, "refusal_tokens", self.refusal_tokens),
            (self.init != InitMode.text or self.init_text != "", "init_text", "empty with init=text"),
            (bool(self.harmful) and bool(self.benign), "prompt files", "none found for a class"),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ValueError(f"invalid training config: {name}={value!r}")
        try:
            self.device = resolve_device(self.device).type
        except ValueError as exc:
            raise ValueError(f"invalid training config: {exc}") from None

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
