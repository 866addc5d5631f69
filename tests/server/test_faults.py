"""Real faults at the boundary: a full disk (a real tmpfs) and ``kill -9`` of a real process mid-write.

Each case must lose nothing: no torn file, floors intact, the last good state serving, and a clear
log line and metric for the failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patches.format import parse_patch
from patches.rollback import VersionLedger
from tests.server.test_admin import Env, applied, make_env, start, upload


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> Env:
    return make_env(model_dir, tmp_path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, mounted for the test (root only; CI runs as root)."""
    if not _can_mount():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the full-disk tests: needs root and mount")
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("full", ["patch_dir", "state_dir"])
def test_a_full_disk_refuses_the_upload_with_503_and_loses_nothing(env: Env, small_disk: Path, full: str) -> None:
    dirs = {"patch_dir": env.patch_dir, "state_dir": env.root / "state"}
    if full == "patch_dir":
        shutil.copytree(env.patch_dir, small_disk / "patches")
        dirs["patch_dir"] = small_disk / "patches"
    else:
        dirs["state_dir"] = small_disk / "state"
    http = start(env.settings(**dirs))
    try:
        state = dirs["state_dir"] / "versions.json"
        ledger_before = state.read_bytes()
        filler = _fill(small_disk)
        response = upload(http, env.patch_bytes(2))
        assert response.status_code == 503, response.text
        assert "No space left" in response.json()["error"]["message"]
        assert applied(http) == "safety@1" and state.read_bytes() == ledger_before
        assert sorted(p.name for p in dirs["patch_dir"].iterdir()) == ["safety-v1.safetensors"]  # no torn file
        assert 'patchserve_patch_load_failures_total{reason="state_write"} 1.0' in http.get("/metrics").text
        filler.unlink()
        assert upload(http, env.patch_bytes(2)).status_code == 201  # space back: the same upload goes through
        assert applied(http) == "safety@2"
    finally:
        http.__exit__(None, None, None)


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from patches.format import PatchMetadata, dump_patch
    from patches.registry import PatchRegistry
    from patches.rollback import VersionLedger
    from patches.format import parse_patch
    from patches.fingerprint import ModelSpec

    root = Path(sys.argv[1])
    spec = ModelSpec(fingerprint="sha256:" + "0" * 64, hidden_size=8, max_rows=4, dtype="float32")
    ledger = VersionLedger(root / "state" / "versions.json")
    registry = PatchRegistry(lambda data: parse_patch(data, expect=spec), ledger)
    registry.load_dir(root / "patches")
    version = registry.ledger.floor("crash") + 1
    while True:
        meta = PatchMetadata(name="crash", version=version, base_model=spec.fingerprint)
        rows = torch.full((4, 8), float(version)) + torch.arange(32.0).reshape(4, 8)
        registry.load_bytes(dump_patch(rows, meta), root / "patches")
        print(version, flush=True)
        version += 1
    """
)


def _writer(root: Path, code: str = _WRITER) -> subprocess.Popen:
    """A real process running ``code`` on the files under ``root``."""
    return subprocess.Popen(
        [sys.executable, "-c", code, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_kill_9_during_uploads_and_ledger_writes_leaves_valid_state(tmp_path: Path) -> None:
    """A real process publishes versions as fast as it can (each one a patch file plus a ledger write);
    it is killed with SIGKILL at a different moment each round, then restarted on the same files."""
    from patches.fingerprint import ModelSpec

    (tmp_path / "patches").mkdir()
    spec = ModelSpec(fingerprint="sha256:" + "0" * 64, hidden_size=8, max_rows=4, dtype="float32")
    confirmed = 0
    for round_ in range(6):
        process = _writer(tmp_path)
        assert process.stdout is not None
        for _ in range(3 + round_ * 4):  # let it get into its loop, then kill at a varying point
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "writer died"
            confirmed = max(confirmed, int(line))
        time.sleep(0.003 * round_)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        state = json.loads((tmp_path / "state" / "versions.json").read_text())  # never torn
        ledger = VersionLedger(tmp_path / "state" / "versions.json")
        assert ledger.floor("crash") >= confirmed  # nothing confirmed was lost
        for path in (tmp_path / "patches").glob("*.safetensors"):
            patch = parse_patch(path.read_bytes(), expect=spec)  # no torn patch file
            assert state["patches"]["crash"]["versions"][str(patch.version)] == patch.digest  # every file recorded


_RELOADER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from patches.fingerprint import ModelSpec
    from patches.format import PatchMetadata, dump_patch, parse_patch
    from patches.registry import PatchRegistry
    from patches.rollback import VersionLedger
    from patches.tenants import load_tenants
    from server.control import ControlPlane
    from server.tenancy import TenantResolver

    root = Path(sys.argv[1])
    spec = ModelSpec(fingerprint="sha256:" + "0" * 64, hidden_size=8, max_rows=4, dtype="float32")
    ledger = VersionLedger(root / "state" / "versions.json")
    registry = PatchRegistry(lambda data: parse_patch(data, expect=spec), ledger)
    tenants_file = root / "tenants" / "tenants.yaml"
    config = load_tenants(tenants_file)
    resolver = TenantResolver(config, registry, separator_id=0, dtype=torch.float32)
    control = ControlPlane(registry, resolver, patch_dir=root / "patches", tenants_file=tenants_file)
    control.check_tenants(config, at_start=True)
    registry.pinned = resolver.pinned
    control.load_all()
    version = registry.ledger.floor("crash") + 1
    while True:  # reload the swapped tenant file and publish a version (a ledger write), over and over
        assert control.reload_tenants() is None
        meta = PatchMetadata(name="crash", version=version, base_model=spec.fingerprint)
        control.upload(dump_patch(torch.full((4, 8), float(version)), meta))
        print(version, len(resolver.config.tenants), flush=True)
        version += 1
    """
)


def _swap_tenants(directory: Path, generation: int) -> None:
    """Swap the tenant file the way the kubelet updates a mounted ConfigMap: write a new timestamped
    directory, then atomically re-point the ``..data`` symlink the file links through."""
    tenants = [{"id": "app", "default_stack": [], "allowed_patches": ["crash"], "allow_unpatched": True}]
    tenants += [{"id": f"extra-{i}", "default_stack": [], "allow_unpatched": True} for i in range(generation % 3)]
    data = directory / f"..{generation:06d}"
    data.mkdir()
    (data / "tenants.yaml").write_text(json.dumps({"tenants": tenants}))
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(directory / "..data")
    if not (directory / "tenants.yaml").is_symlink():
        (directory / "tenants.yaml").symlink_to("..data/tenants.yaml")


def test_kill_9_during_tenant_file_swaps_leaves_the_last_good_config_and_the_floors(tmp_path: Path) -> None:
    """A real process reloads a tenant file that is being swapped under it (ConfigMap style) while it
    publishes versions; it is killed with SIGKILL at a different moment each round. After each kill the
    tenant file is whole, a restart serves the configuration on disk, and no confirmed version is lost."""
    from patches.fingerprint import ModelSpec
    from patches.tenants import load_tenants

    for sub in ("patches", "tenants"):
        (tmp_path / sub).mkdir()
    generation = 0
    _swap_tenants(tmp_path / "tenants", generation)
    spec = ModelSpec(fingerprint="sha256:" + "0" * 64, hidden_size=8, max_rows=4, dtype="float32")
    confirmed = 0
    for round_ in range(5):
        process = _writer(tmp_path, _RELOADER)
        assert process.stdout is not None
        for _ in range(4 + round_ * 3):
            generation += 1
            _swap_tenants(tmp_path / "tenants", generation)
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "reloader died"
            confirmed = max(confirmed, int(line.split()[0]))
        time.sleep(0.002 * round_)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        on_disk = load_tenants(tmp_path / "tenants" / "tenants.yaml")  # whole: a swap is one rename
        assert len(on_disk.tenants) == 1 + generation % 3
        assert VersionLedger(tmp_path / "state" / "versions.json").floor("crash") >= confirmed
        for path in (tmp_path / "patches").glob("*.safetensors"):
            parse_patch(path.read_bytes(), expect=spec)  # no torn patch file
    # the restarted process comes up on the configuration on disk and continues above every floor
    process = _writer(tmp_path, _RELOADER)
    assert process.stdout is not None
    try:
        version, tenants = (int(x) for x in process.stdout.readline().split())
    finally:
        process.kill()
        process.wait(timeout=30)
    assert version > confirmed  # no version number is reused after the kills
    assert tenants == 1 + generation % 3
