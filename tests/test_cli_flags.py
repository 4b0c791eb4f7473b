"""Command-line spellings: `--lwc`, the official OmniQuant underscore aliases, and no argparse prefix matching."""

import pytest

from omniquant import calibrate
from omniquant.cli import COMMANDS, build_parser, main
from omniquant.config import CalibConfig


def calib_config(monkeypatch, *flags) -> tuple[CalibConfig, dict]:
    """Run `omniquant calibrate` up to the library call; return the CalibConfig it would use and the other kwargs."""
    seen = {}

    def fake_calibrate(model, output, *, overwrite=False, resume=None, streams="auto", **settings):
        seen.update(model=model, output=output, resume=resume, streams=streams, cfg=CalibConfig(**settings))
        return output

    monkeypatch.setattr(calibrate, "calibrate_checkpoint", fake_calibrate)
    monkeypatch.setattr(calibrate, "resolve_model", lambda model, revision=None: f"{model}@{revision}")
    assert main(["calibrate", "--model", "m", "--output", "o", *flags] if "--save_dir" not in flags
                else ["calibrate", "--model", "m", *flags]) == 0
    return seen.pop("cfg"), seen


def test_lwc_flag_and_default(monkeypatch):
    assert calib_config(monkeypatch)[0].lwc is True
    assert calib_config(monkeypatch, "--lwc")[0].lwc is True
    assert calib_config(monkeypatch, "--no-lwc")[0].lwc is False
    assert calib_config(monkeypatch, "--no-lwc", "--lwc")[0].lwc is True  # last one wins
    assert calib_config(monkeypatch, "--lwc", "--lwc-lr", "0.05")[0].lwc_lr == 0.05


def test_keep_best_is_opt_in(monkeypatch):
    assert calib_config(monkeypatch)[0].keep_best is False
    assert calib_config(monkeypatch, "--keep-best")[0].keep_best is True
    assert calib_config(monkeypatch, "--keep-best", "--no-keep-best")[0].keep_best is False


def test_streams_flag(monkeypatch):
    assert calib_config(monkeypatch)[1]["streams"] == "auto"
    assert calib_config(monkeypatch, "--streams", "disk")[1]["streams"] == "disk"
    with pytest.raises(SystemExit):
        calib_config(monkeypatch, "--streams", "ram")


@pytest.mark.parametrize("official, ours, value, field, expected", [
    ("--group_size", "--group-size", "64", "group_size", 64),
    ("--lwc_lr", "--lwc-lr", "0.003", "lwc_lr", 0.003),
    ("--let_lr", "--let-lr", "0.0007", "let_lr", 0.0007),
    ("--calib_dataset", "--calib-data", "c4", "calib_data", "c4"),
    ("--batch_size", "--batch-size", "2", "batch_size", 2),
    ("--aug_loss", "--aug-loss", None, "aug_loss", True),
    ("--nsamples", "--nsamples", "16", "nsamples", 16),
    ("--wbits", "--wbits", "3", "wbits", 3),
    ("--abits", "--abits", "4", "abits", 4),
    ("--epochs", "--epochs", "7", "epochs", 7),
    ("--let", "--let", None, "let", True),
    ("--symmetric", "--symmetric", None, "symmetric", True),
    ("--alpha", "--alpha", "0.75", "alpha", 0.75),
    ("--wd", "--wd", "0.1", "wd", 0.1),
    ("--seed", "--seed", "5", "seed", 5),
])
def test_official_spellings_set_the_same_field(monkeypatch, official, ours, value, field, expected):
    args = [official] + ([value] if value is not None else [])
    cfg = calib_config(monkeypatch, *args)[0]
    assert getattr(cfg, field) == expected
    assert getattr(CalibConfig(), field) != expected  # the flag changed something
    assert cfg == calib_config(monkeypatch, ours, *args[1:])[0]


def test_save_dir_resume_and_revision(monkeypatch):
    _, seen = calib_config(monkeypatch, "--save_dir", "ckpt", "--resume", "st", "--revision", "abc")
    assert seen == {"model": "m@abc", "output": "ckpt", "resume": "st", "streams": "auto"}


def test_official_output_dir_is_refused_with_the_mapping(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", "m", "--output", "o", "--output_dir", "./log"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--output_dir is the official main.py's log directory" in err and "--save_dir" in err


@pytest.mark.parametrize("prefix", [["--lwc-l", "0.1"], ["--group", "64"], ["--calib", "c4"], ["--out", "x"],
                                    ["--nsample", "4"], ["--let-l", "0.1"], ["--aug"], ["--save", "x"]])
def test_prefixes_are_rejected(prefix, capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", "m", "--output", "o", *prefix])
    assert e.value.code == 2
    assert f"unrecognized arguments: {' '.join(prefix)}" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_parser_has_prefix_matching_off(command):
    parser = build_parser(command)
    assert parser.allow_abbrev is False
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.allow_abbrev is False
    long_opts = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and len(o) > 5]
    assert long_opts  # every command has options whose prefixes would otherwise be accepted
    required = [x for a in sub._actions if a.required for x in (a.option_strings[0], "1")]
    for opt in long_opts:
        _, extra = sub.parse_known_args([*required, opt[:-1]])
        assert extra == [opt[:-1]], opt  # a prefix stays an unknown argument, never taken for the option
