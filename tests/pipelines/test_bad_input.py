"""Bad input as a new user types it: each gets one clear message naming the cause and the fix, exit status 2,
no traceback, and touches nothing. Real files, the real CLI parser, a real folder of images."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.cli import stages
from pipelines.config import load_config
from pipelines.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def _run(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `vaepipe ARGS`, whether argparse or a command handler refuses the input."""
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "argument --n: 0 must be at least 1"),
    (["--n", "-5"], "argument --n: -5 must be at least 1"),
    (["--temperature", "-1"], "argument --temperature: -1.0 must be a finite number above 0"),
    (["--temperature", "nan"], "must be a finite number above 0"),
    (["--method", "sir", "--n", "0"], "argument --n: 0 must be at least 1"),  # NCP models
    (["--method", "langevin", "--temperature", "-1"], "must be a finite number above 0"),
])
def test_sample_refuses_bad_counts_and_temperatures(args, says, capsys, tmp_path):
    code, err = _run(["sample", "models:/demo-ncp@candidate", "--out", str(tmp_path / "s.png"), *args], capsys)
    assert code == 2 and says in err
    assert not (tmp_path / "s.png").exists()


def test_evaluate_refuses_k_0(capsys, tmp_path):
    code, err = _run(["evaluate", "models:/demo-nvae@candidate", "--data", str(tmp_path), "--k", "0"], capsys)
    assert code == 2 and "argument --k: 0 must be at least 1" in err


def test_sample_out_into_a_missing_or_unwritable_directory(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "s.png"
    code, err = _run(["sample", "models:/demo-nvae@candidate", "--out", str(missing),
                      "--tracking-uri", "http://127.0.0.1:9"], capsys)  # refused before any tracking call
    assert code == 2 and f"directory {missing.parent} does not exist" in err and "mkdir -p" in err
    assert not missing.parent.exists()  # not created behind the user's back
    code, err = _run(["sample", "models:/demo-nvae@candidate", "--out", str(tmp_path),
                      "--tracking-uri", "http://127.0.0.1:9"], capsys)
    assert code == 2 and "is a directory" in err
    if os.getuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, err = _run(["sample", "models:/demo-nvae@candidate", "--out", str(ro / "s.png"),
                          "--tracking-uri", "http://127.0.0.1:9"], capsys)
        assert code == 2 and "cannot be written" in err


def test_an_empty_config_file_is_refused(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = _run(["config", "validate", str(empty)], capsys)
    assert code == 2 and "is empty" in err and "name:" in err
    empty.write_text("# only a comment\n")
    code, err = _run(["config", "validate", str(empty)], capsys)
    assert code == 2 and "is empty" in err
    (tmp_path / "ok.yaml").write_text("name: mine\n")  # one line is enough: everything else has a default
    assert _run(["config", "validate", str(tmp_path / "ok.yaml")], capsys)[0] == 0


def test_a_user_error_in_a_handler_is_one_line_and_exit_2(capsys):
    with pytest.raises(UserError):  # what the handler meets is a UserError, whoever catches it
        load_config(DEMO, ["train.lr=-1"])
    capsys.readouterr()
    code = cli.main(["config", "show", str(DEMO), "--set", "train.lr=-1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # nothing half-printed
    assert err.splitlines() == ["vaepipe: error: train.lr: -1.0 is out of range; allowed: > 0"]
    code, err = _run(["config", "validate", str(REPO / "configs" / "no-such.yaml")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err and "configs/demo.yaml" in err


def test_only_user_errors_become_exit_2_and_ctrl_c_is_130_with_the_resume_line(capsys, monkeypatch):
    def bug(args):
        raise KeyError("a bug, not a user's mistake")

    monkeypatch.setattr(stages, "config_show", bug)
    with pytest.raises(KeyError, match="a bug"):  # a bug keeps its traceback
        cli.main(["config", "show", str(DEMO)])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "train", interrupted)
    capsys.readouterr()
    assert cli.main(["train", str(DEMO)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("vaepipe: interrupted") and "vaepipe train CONFIG --resume" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ folder source


def _png(path: Path, width: int, height: int) -> None:
    """A grey PNG of the given size; the pixel data of large ones is not written (their header is what matters:
    it is all that is read before the size is refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + bytes((x * 7 + y * 3) % 256 for x in range(width)) for y in range(height)) \
        if width * height <= 4096 else b"\0" * 64
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _folder(tmp_path: Path, n: int = 12) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(n):
        _png(root / f"img{i:02d}.png", 16, 16)
    return root


@pytest.mark.parametrize("side", [14000, 10_500])  # over PIL's own hard limit, and between its warning and it
def test_a_huge_image_in_a_folder_is_refused_before_decoding(side, capsys, tmp_path):
    root = _folder(tmp_path)
    _png(root / "scan.png", side, side)
    code, err = _run(["data", "prepare", "folder", str(root), "--out", str(tmp_path / "ds"), "--image-size", "8"],
                     capsys)
    assert code == 2 and "scan.png" in err and "Mpixel limit" in err and "downscale" in err
    assert f"{side * side / 1e6:.0f} Mpixels" in err
    assert not (tmp_path / "ds").exists()


def test_symlinks_out_of_the_folder_are_refused_unless_followed(capsys, tmp_path):
    root = _folder(tmp_path)
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    _png(secret_dir / "private.png", 16, 16)
    (root / "link.png").symlink_to(secret_dir / "private.png")
    (root / "sub").symlink_to(secret_dir, target_is_directory=True)
    (root / "inside.png").symlink_to(root / "img00.png")  # a link that stays inside is fine
    code, err = _run(["data", "prepare", "folder", str(root), "--out", str(tmp_path / "ds")], capsys)
    assert code == 2 and "symlinks to files outside it" in err and "--follow-symlinks" in err
    assert "link.png" in err and not (tmp_path / "ds").exists()
    code, _ = _run(["data", "prepare", "folder", str(root), "--out", str(tmp_path / "ds"), "--follow-symlinks"],
                   capsys)
    assert code == 0 and (tmp_path / "ds" / "dataset.json").exists()
    (root / "link.png").unlink()
    (root / "sub").unlink()
    code, _ = _run(["data", "prepare", "folder", str(root), "--out", str(tmp_path / "ds2")], capsys)
    assert code == 0
