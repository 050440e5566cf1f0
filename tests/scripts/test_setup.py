"""Tests of the shell scripts themselves (scripts/setup, build, up, venv), run by scripts/test.

Each test copies scripts/ into a temporary repository and runs it with HOME, PATH and every
toolchain location pointing at fakes in a temporary directory, so nothing real is installed:
fake `rustup`, `cargo` and `apt-get` log their arguments and do what the test tells them.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"

FAKE_RUSTUP = r"""#!/bin/sh
# Fake rustup. $FAKE_RUSTUP_ADD: ok | fail | hang. The target counts as installed once
# the file "$dir/wasm-installed" exists.
dir="$(dirname "$0")"
echo "rustup $*" >> "$FAKE_LOG"
case "$*" in
  "target list --installed")
    echo x86_64-unknown-linux-gnu
    [ -f "$dir/wasm-installed" ] && echo wasm32-wasip2
    exit 0 ;;
  "target add wasm32-wasip2")
    case "${FAKE_RUSTUP_ADD:-fail}" in
      ok) touch "$dir/wasm-installed"; echo "info: downloading component 'rust-std' for 'wasm32-wasip2'" >&2; exit 0 ;;
      hang) sleep 30; exit 0 ;;
      *) echo "error: could not download file from 'https://static.rust-lang.org/': no route to host" >&2; exit 1 ;;
    esac ;;
esac
exit 2
"""

# Logs its arguments (and the variables Debian's route sets) and succeeds.
FAKE_LOGGER = r"""#!/bin/sh
echo "$(basename "$0") $* RUSTC=${RUSTC:-} RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-} RUSTFLAGS=${RUSTFLAGS:-}" >> "$FAKE_LOG"
"""

FAKE_DEBIAN_RUSTC = r"""#!/bin/sh
echo "rustc 1.96.0 (Debian)"
"""

FAKE_FREERELAY = r"""#!/bin/sh
echo "freerelay $*" >> "$FAKE_LOG"
case "$1 $2" in
  "keygen --quiet") printf 'fr-testkey\nthe-digest\n' ;;
  "keygen --digest-of") echo "digest-of-$3" ;;
  up*) echo "freerelay up CLIENT_KEYS=$SPIN_VARIABLE_CLIENT_KEYS" ;;
esac
"""

FAKE_SPIN = r"""#!/bin/sh
echo "spin $* CLIENT_KEYS=${SPIN_VARIABLE_CLIENT_KEYS:-}"
"""


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class Sandbox:
    """A copy of scripts/ in tmp/repo, with fakes in tmp/home/.cargo/bin and tmp/bin."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.repo = tmp / "repo"
        shutil.copytree(SCRIPTS, self.repo / "scripts")
        self.home = tmp / "home"
        self.cargo_bin = self.home / ".cargo" / "bin"
        self.bin = tmp / "bin"
        self.log = tmp / "calls.log"
        self.log.touch()
        self.rustup = write_exe(self.cargo_bin / "rustup", FAKE_RUSTUP)
        write_exe(self.cargo_bin / "cargo", FAKE_LOGGER)
        self.apt_get = write_exe(self.bin / "apt-get", FAKE_LOGGER)
        missing = tmp / "nonexistent"
        self.env = {
            "HOME": str(self.home),
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "FAKE_LOG": str(self.log),
            "FREERELAY_RUSTUP_TIMEOUT": "10",
            "FREERELAY_APT_GET": str(self.apt_get),
            # No Debian toolchain at all.
            "FREERELAY_DEBIAN_RUSTC": str(missing / "rustc"),
            "FREERELAY_DEBIAN_CARGO": str(missing / "cargo"),
            "FREERELAY_RUST_SRC": str(missing / "library"),
            "FREERELAY_WASI_LIBC": str(missing / "wasm32-wasi"),
            "FREERELAY_WASM_LD": str(missing / "wasm-ld"),
            "FREERELAY_WASM_COMPONENT_LD": str(missing / "wasm-component-ld"),
        }

    def install_rustup_target(self):
        (self.cargo_bin / "wasm-installed").touch()

    def install_debian_toolchain(self):
        deb = self.tmp / "debian"
        write_exe(deb / "rustc", FAKE_DEBIAN_RUSTC)
        write_exe(deb / "cargo", FAKE_LOGGER)
        (deb / "library").mkdir()
        (deb / "wasm32-wasi").mkdir()
        (deb / "wasm32-wasi" / "libc.a").touch()
        write_exe(deb / "wasm-ld", "#!/bin/sh\n")
        write_exe(deb / "wasm-component-ld", "#!/bin/sh\n")
        self.env.update(
            FREERELAY_DEBIAN_RUSTC=str(deb / "rustc"),
            FREERELAY_DEBIAN_CARGO=str(deb / "cargo"),
            FREERELAY_RUST_SRC=str(deb / "library"),
            FREERELAY_WASI_LIBC=str(deb / "wasm32-wasi"),
            FREERELAY_WASM_LD=str(deb / "wasm-ld"),
            FREERELAY_WASM_COMPONENT_LD=str(deb / "wasm-component-ld"),
        )

    def run(self, script, *args, timeout=60, **env):
        result = subprocess.run(
            [str(self.repo / "scripts" / script), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        print(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def calls(self):
        return self.log.read_text().splitlines()


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


# (a) rustup cannot add the target, no Debian toolchain: a dry run reaches the apt-get step.
def test_setup_without_debian_rustc_or_wasm_target_reaches_apt_install(box):
    r = box.run("setup", FREERELAY_SETUP_DRY_RUN="1", FAKE_RUSTUP_ADD="fail")
    assert r.returncode == 0
    assert "rustup target add wasm32-wasip2" in box.calls()
    assert "'rustup target add wasm32-wasip2' failed" in r.stderr
    assert "no route to host" in r.stderr  # rustup's own reason is shown
    assert re.search(
        r"would run: .*apt-get update", r.stderr
    ), "setup must run apt-get update before installing"
    assert re.search(
        r"would run: .*apt-get install -y -qq rustc-web cargo-web rust-web-src wasi-libc lld", r.stderr
    )
    assert "would run: cargo install wasm-component-ld --locked" in r.stderr
    assert "dry run: nothing was installed" in r.stderr
    # A dry run runs no installer.
    assert not [c for c in box.calls() if c.startswith(("apt-get", "cargo"))]


def test_setup_rustup_target_add_timing_out_falls_back_to_debian(box):
    r = box.run(
        "setup", FREERELAY_SETUP_DRY_RUN="1", FAKE_RUSTUP_ADD="hang", FREERELAY_RUSTUP_TIMEOUT="1"
    )
    assert r.returncode == 0
    assert "timed out after 1s" in r.stderr
    assert re.search(r"would run: .*apt-get install .*rustc-web", r.stderr)


# (b) rustup can add the target: that is used, and Debian's packages are not touched.
def test_setup_installs_rustup_target_when_rustup_can(box):
    r = box.run("setup", FREERELAY_SETUP_DRY_RUN="1", FAKE_RUSTUP_ADD="ok")
    assert r.returncode == 0
    assert "installed rustup's wasm32-wasip2 target" in r.stderr
    assert "rustup target add wasm32-wasip2" in box.calls()
    assert "apt-get" not in r.stderr


# (c) neither rustup's target nor apt-get: a clear message and a failure.
def test_setup_without_apt_get_fails_with_a_message(box):
    r = box.run(
        "setup",
        FREERELAY_SETUP_DRY_RUN="1",
        FAKE_RUSTUP_ADD="fail",
        FREERELAY_APT_GET=str(box.tmp / "nonexistent" / "apt-get"),
    )
    assert r.returncode != 0
    assert "[setup] error:" in r.stderr
    assert "no apt-get" in r.stderr
    assert "rustup target add wasm32-wasip2" in r.stderr  # what to do


def test_setup_without_rustup_uses_debian_route(box):
    box.rustup.unlink()
    r = box.run("setup", FREERELAY_SETUP_DRY_RUN="1")
    assert r.returncode == 0
    assert "rustup" in r.stderr and "not found" in r.stderr
    assert re.search(r"would run: .*apt-get install .*rust-web-src", r.stderr)


def test_setup_fast_path_with_rustup_target_installs_nothing(box):
    box.install_rustup_target()
    r = box.run("setup")  # not a dry run: nothing may be needed
    assert r.returncode == 0
    assert "using rustup's wasm32-wasip2 target" in r.stderr
    assert box.calls() == ["rustup target list --installed"]


def test_setup_fast_path_with_complete_debian_toolchain_installs_nothing(box):
    box.install_debian_toolchain()
    r = box.run("setup")
    assert r.returncode == 0
    assert "using Debian's rustc" in r.stderr
    assert "rustup target add wasm32-wasip2" not in box.calls()
    assert not [c for c in box.calls() if c.startswith(("apt-get", "cargo"))]


def test_setup_apt_mode_updates_then_installs(box):
    r = box.run("setup", "--apt", "shellcheck", FREERELAY_SETUP_DRY_RUN="1")
    assert r.returncode == 0
    lines = [l for l in r.stderr.splitlines() if "would run" in l]
    assert len(lines) == 2
    assert re.search(r"apt-get update", lines[0])
    assert re.search(r"apt-get install -y -qq shellcheck$", lines[1])


def test_build_uses_debian_cargo_with_build_std_when_no_rustup_target(box):
    box.install_debian_toolchain()
    # A component "built" earlier, so the listing at the end has something to show.
    out = box.repo / "components" / "target" / "wasm32-wasip2" / "release"
    out.mkdir(parents=True)
    (out / "freerelay_gateway.wasm").write_bytes(b"\0asm")
    r = box.run("build", CARGO_TARGET_DIR=str(box.tmp / "elsewhere"))
    assert r.returncode == 0
    cargo = [c for c in box.calls() if c.startswith("cargo ")]
    assert len(cargo) == 1
    assert "build -Zbuild-std=std,panic_abort --target wasm32-wasip2 --release" in cargo[0]
    assert f"RUSTC={box.env['FREERELAY_DEBIAN_RUSTC']} RUSTC_BOOTSTRAP=1" in cargo[0]
    assert f"-L {box.env['FREERELAY_WASI_LIBC']}" in cargo[0]
    assert "[build] components/target/wasm32-wasip2/release/freerelay_gateway.wasm (4 bytes)" in r.stderr


def test_build_prefers_rustup_target_and_finds_cargo_in_dot_cargo_bin(box):
    box.install_rustup_target()
    box.install_debian_toolchain()
    out = box.repo / "components" / "target" / "wasm32-wasip2" / "release"
    out.mkdir(parents=True)
    (out / "freerelay_gateway.wasm").write_bytes(b"\0asm")
    r = box.run("build")  # PATH has no ~/.cargo/bin: build must add it
    assert r.returncode == 0
    cargo = [c for c in box.calls() if c.startswith("cargo ")]
    assert cargo and cargo[0].startswith("cargo build --target wasm32-wasip2 --release RUSTC= ")


def test_up_with_spin_gets_the_client_key(box):
    box.install_rustup_target()
    out = box.repo / "components" / "target" / "wasm32-wasip2" / "release"
    out.mkdir(parents=True)
    (out / "freerelay_gateway.wasm").write_bytes(b"\0asm")
    target = box.tmp / "target"
    write_exe(target / "release" / "freerelay", FAKE_FREERELAY)
    write_exe(box.bin / "spin", FAKE_SPIN)
    r = box.run("up", "--listen", "127.0.0.1:9", FREERELAY_USE_SPIN="1", CARGO_TARGET_DIR=str(target))
    assert r.returncode == 0
    assert "spin up --listen 127.0.0.1:9 CLIENT_KEYS=digest-of-fr-testkey" in r.stdout
    assert (box.repo / ".spin" / "client-key").read_text() == "fr-testkey\n"
    assert "client key (from .spin/client-key): fr-testkey" in r.stderr
    assert "no provider key set" in r.stderr


# (d) a .venv without pip (what `python3 -m venv` leaves without python3-venv) is rebuilt.
def test_venv_rebuilds_a_half_made_venv(box):
    venv = box.tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")  # python, but no pip
    r = box.run("venv", str(venv), FREERELAY_PYTHON=sys.executable, timeout=300)
    assert r.returncode == 0
    assert "half-made" in r.stderr
    assert (venv / "bin" / "pip").exists()
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True)
    assert check.returncode == 0


def test_venv_keeps_a_working_venv(box):
    venv = box.tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    marker = venv / "marker"
    marker.touch()
    r = box.run("venv", str(venv), FREERELAY_PYTHON=sys.executable, timeout=300)
    assert r.returncode == 0
    assert marker.exists()
    assert "made" not in r.stderr


def test_venv_without_ensurepip_installs_python3_venv(box):
    # A python whose venv module fails the way Debian's does without python3-venv.
    fake_python = write_exe(
        box.bin / "python3",
        '#!/bin/sh\nmkdir -p "$3/bin"\n'
        'echo "The virtual environment was not created successfully because ensurepip is not available." \n'
        "exit 1\n",
    )
    venv = box.tmp / "venv"
    r = box.run("venv", str(venv), FREERELAY_PYTHON=str(fake_python), FREERELAY_SETUP_DRY_RUN="1")
    assert r.returncode == 0
    assert "ensurepip is not available" in r.stderr
    assert re.search(r"would run: .*apt-get install -y -qq python3-venv", r.stderr)
    assert not venv.exists()  # the half-made directory is not left behind


# The bug class behind the issue: under pipefail a pipe into an early-exiting reader can fail.
@pytest.mark.parametrize("script", ["setup", "build", "up", "test", "venv"])
def test_no_pipe_into_early_exiting_reader(script):
    text = (SCRIPTS / script).read_text()
    code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    assert not re.search(r"\|\s*(grep\s+(-\w*q|--quiet)|head\b)", code)
