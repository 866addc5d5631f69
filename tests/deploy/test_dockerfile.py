"""Offline checks of the container image definition: Dockerfile and .dockerignore.

The Dockerfile is parsed with dockerfile-parse 2.0.1 (instructions with line continuations joined), then
split into stages here. Nothing is built: the checks are on what the file says, plus one behavioural check,
the HEALTHCHECK command run against a throw-away HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
TARGETS = ("cpu", "gpu")


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM image as written (ARGs not substituted)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)

    def values(self, instruction: str) -> list[str]:
        return [value for inst, value in self.instructions if inst == instruction]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for value in self.values("ENV"):
            for item in shlex.split(value):
                key, sep, val = item.partition("=")
                assert sep, f"ENV must use key=value form, got {item!r}"
                out[key] = val
        return out


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    parser = DockerfileParser(path=str(DOCKERFILE))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        inst, value = item["instruction"], item["value"]
        if inst == "COMMENT":
            continue
        if inst == "FROM":
            words = value.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            assert inst == "ARG", f"only ARG may precede the first FROM, got {inst}"
            key, _, default = value.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append((inst, value))
    assert stages, "Dockerfile has no FROM"
    return global_args, stages


def stage_named(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert len(found) == 1, f"expected exactly one stage named {name!r}"
    return found[0]


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def exec_form(value: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD; fails for shell form."""
    try:
        argv = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"not exec (JSON) form: {value!r}")
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
    return argv


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse()


def test_target_build_arg_selects_an_os_stage_for_cpu_and_gpu(dockerfile):
    args, stages = dockerfile
    assert args.get("TARGET") == "cpu", "the CPU image must be the default (ARG TARGET=cpu)"
    names = {s.name for s in stages}
    derived = [s for s in stages if "$" in s.base]
    assert derived, "build/runtime stages should start FROM the target's OS stage"
    for target in TARGETS:
        for stage in derived:
            resolved = substitute(stage.base, {**args, "TARGET": target})
            assert resolved in names, f"TARGET={target}: stage {stage.name} starts from unknown {resolved!r}"


def test_every_external_base_image_is_pinned_by_tag_and_digest(dockerfile):
    _, stages = dockerfile
    names = {s.name for s in stages}
    external = [s.base for s in stages if "$" not in s.base and s.base not in names]
    assert len(external) >= 2, f"expected a CPU and a GPU base image, got {external}"
    for image in external:
        assert DIGEST.search(image), f"{image} is not pinned by @sha256 digest"
        name_tag = DIGEST.sub("", image)
        repo, sep, tag = name_tag.rpartition(":")
        assert sep and "/" not in tag, f"{image} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: tag {tag!r} is not an exact version"


def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    _, stages = dockerfile
    users = stages[-1].values("USER")
    assert users, "the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root uid, got {users[-1]!r}"
    assert not gid or (gid.isdigit() and int(gid) > 0)


def test_final_stage_serves_on_all_interfaces_offline_with_healthcheck_and_exec_cmd(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    env = final.env()
    assert env.get("PATCHSERVE_HOST") == "0.0.0.0"
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    port = env.get("PATCHSERVE_PORT", "8000")
    assert port in " ".join(final.values("EXPOSE")).split(), f"EXPOSE {port} is missing"
    assert final.values("STOPSIGNAL") == ["SIGTERM"]
    cmd = exec_form(final.values("CMD")[-1])
    assert cmd[-2:] == ["-m", "server"] and "python" in cmd[0]
    assert not final.values("ENTRYPOINT"), "an ENTRYPOINT would wrap the server (signals, argv)"
    checks = final.values("HEALTHCHECK")
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    assert "/healthz" in checks[0]


def test_model_is_prepared_at_build_time_into_the_runtime_cache_dir(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    cache_dir = final.env().get("PATCHSERVE_CACHE_DIR")
    assert cache_dir, "the runtime stage must point PATCHSERVE_CACHE_DIR at the prepared model"
    copies = [v for v in final.values("COPY") if v.startswith("--from=")]
    sources = {}
    for value in copies:
        flag, src, dst = value.split()
        sources[dst] = (flag.removeprefix("--from="), src)
    assert cache_dir in sources, f"no COPY --from=<stage> into {cache_dir}"
    builder = stage_named(stages, sources[cache_dir][0])
    assert builder.env().get("PATCHSERVE_CACHE_DIR") == sources[cache_dir][1]
    assert any("patches.cli prepare-model" in run for run in builder.values("RUN"))
    assert builder.env().get("HF_HUB_OFFLINE") == "1", "the build must not reach a model hub either"


def test_no_demo_keys_patches_or_local_state_are_copied_into_the_image(dockerfile):
    _, stages = dockerfile
    for stage in stages:
        assert not stage.values("ADD"), "use COPY (ADD fetches URLs and unpacks archives)"
        for value in stage.values("COPY"):
            if value.startswith("--from="):
                continue
            words = [w for w in value.split() if not w.startswith("--")]
            for src in words[:-1]:
                assert not src.startswith(("deploy", "var", ".venv", "bench-results", ".")), src
                assert not src.endswith((".key", ".safetensors")), src
                assert src in {"pyproject.toml", "README.md"} or (REPO / src).exists(), f"COPY of missing {src}"


# ---- .dockerignore -----------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (moby/patternmatcher) glob: `**` any number of directories, `*` and `?` within one."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + "$")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching pattern decides, and a
    pattern also matches a path whose leading directories (as many as the pattern has parts) it matches."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.removeprefix("!")).lstrip("/")
        regex = _pattern_regex(pattern)
        n = pattern.count("/") + 1
        if regex.match(path) or (n < len(parts) and regex.match("/".join(parts[:n]))):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matcher_follows_docker_semantics():
    assert dockerignore_excludes("a/b/c.txt", ["a"])
    assert not dockerignore_excludes("a/b/c.txt", ["*", "!a"])
    assert dockerignore_excludes("a/__pycache__/x.pyc", ["*", "!a", "**/__pycache__"])
    assert not dockerignore_excludes("b/c.txt", ["a"])


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "var/patches/refusal-v2.safetensors",
        "var/state/versions.json",
        "bench-results/swap.json",
        "deploy/demo/keys/demo-signer.key",
        "deploy/demo/patches/refusal-v2.safetensors",
        ".git/HEAD",
        "server/__pycache__/app.cpython-312.pyc",
    ],
)
def test_dockerignore_keeps_local_and_secret_files_out_of_the_context(path):
    assert dockerignore_excludes(path, dockerignore_patterns()), f"{path} would be sent to the Docker daemon"


def test_dockerignore_keeps_every_copied_source(dockerfile):
    _, stages = dockerfile
    patterns = dockerignore_patterns()
    sources = [
        src
        for stage in stages
        for value in stage.values("COPY")
        if not value.startswith("--from=")
        for src in value.split()[:-1]
    ]
    assert sources
    for src in sources:
        root = REPO / src
        files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts] if root.is_dir() else [root]
        assert files, f"COPY source {src} has no files"
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel, patterns), f".dockerignore drops {rel}, which the build copies"


# ---- the HEALTHCHECK command, run for real -------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck_argv(stages: list[Stage]) -> list[str]:
    value = stages[-1].values("HEALTHCHECK")[0]
    words = value.split(None, 1)
    while words[0].startswith("--"):
        words = words[1].split(None, 1)
    assert words[0] == "CMD", f"HEALTHCHECK must be CMD, got {words[0]}"
    argv = exec_form(words[1])
    assert argv[0] == "python", "the image has no curl/wget: the check runs the venv's python"
    return [sys.executable, *argv[1:]]


def test_healthcheck_command_passes_on_200_and_fails_otherwise(dockerfile, health_server):
    _, stages = dockerfile
    argv = _healthcheck_argv(stages)
    port, handler = health_server
    env = {**os.environ, "PATCHSERVE_PORT": str(port)}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=20).returncode == 0
    handler.status = 503
    assert subprocess.run(argv, env=env, capture_output=True, timeout=20).returncode != 0
