"""Every command answers a user mistake with one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokencompose.cli import main


def _cases(model: str, out: str) -> list[tuple[list[str], str]]:
    gen = ["--out", out, "--model", model, "--prompt", "a red circle"]
    return [
        (["train", "shapes_tiny", "train.max_steps=lots"], "train.max_steps"),
        (["train", "no_such_preset"], "no_such_preset"),
        (["pretrain", "unet_steps=lots"], "unet_steps"),
        (["generate", *gen, "--steps", "lots"], "generation.steps"),
        (["generate", *gen, "--scheduler", "warp"], "generation.scheduler"),
        (["generate", *gen, "generation.stepz=2"], "did you mean 'steps'"),
        (["generate", "--out", out, "--model", "/no/such/model", "--prompt", "a"], "does not exist"),
        (["generate", *gen, "--checkpoint", "/no/such/ckpt"], "does not exist"),
        (["evaluate", "multigen", "--out", out, "--model", model, "--detector", "nonsense"], "nonsense"),
        (["evaluate", "grounding", "--out", out, "--model", model], "--data"),
        (["evaluate", "grounding", "--out", out, "--model", model, "--data", "/no/such.jsonl"], "does not exist"),
        (
            ["evaluate", "grounding", "--out", out, "--model", model, "--shapes", "2", "--shapes-world", "animals"],
            "not a shapes world",
        ),
        (["visualize", "grid", "--model", model, "--prompt", "a", "--seeds", "x"], "seeds"),
        (["visualize", "attention", "a cat", "--model", model, "--checkpoint", "/no/such"], "does not exist"),
        (["demo", "--out", out, "steps=lots"], "steps"),
        (["export", "--model", "/no/such/model", "--out", out + "/e"], "does not exist"),
        (["prepare", "shapes", "--out", out, "--num", "lots"], "--num"),
        (["compare", "/no/such/results.json"], "/no/such/results.json"),
        (["report", "/no/such/run"], "/no/such/run"),
        (["generate", *gen, "--config", "/no/such.yaml"], "/no/such.yaml"),
    ]


@pytest.mark.parametrize("case", range(20))
def test_user_mistake_is_one_line_exit_2(case: int, model_dir: Path, tmp_path: Path, capsys) -> None:
    argv, words = _cases(str(model_dir), str(tmp_path / "out"))[case]
    with pytest.raises(SystemExit) if argv[:2] == ["prepare", "shapes"] else _NoRaise() as raised:
        rc = main(argv)
    rc = raised.value.code if isinstance(raised, pytest.ExceptionInfo) else rc
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, (argv, err)
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], (argv, err)


class _NoRaise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (["pretrain", "r.yaml", "--work", "w", "unet_steps=5"], "overrides", ["unet_steps=5"]),
        (["pretrain", "r.yaml", "a=1", "--work", "w", "b=2"], "overrides", ["a=1", "b=2"]),
        (["demo", "seed=3", "--smoke", "out=x"], "settings", ["seed=3", "out=x"]),
        (["train", "shapes_tiny", "--print-config", "train.max_steps=2"], "overrides", ["train.max_steps=2"]),
    ],
)
def test_settings_after_an_option_are_taken_in_order(argv: list[str], dest: str, expected: list[str]) -> None:
    """``pretrain R --work W unet_steps=N`` (the recipe's documented resume) is not refused as unrecognized."""
    from tokencompose.cli import build_parser

    assert getattr(build_parser().parse_args(argv), dest) == expected


def test_a_stray_word_after_an_option_is_still_refused(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["pretrain", "r.yaml", "--work", "w", "stray"])
    assert raised.value.code == 2 and "stray" in capsys.readouterr().err
