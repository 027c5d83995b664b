"""Config loading: shipped profiles, overrides, one-line errors for bad keys and values."""

import pytest

from semiseg.config import CONFIG_DIR, load_config


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_profile_loads(name):
    cfg = load_config(name)
    assert cfg.iterations > 0 and cfg.dataset


def test_paper_defaults_of_section_4_2():
    cfg = load_config("paper_cityscapes_dlv2")
    assert (cfg.lambda_sup, cfg.lambda_pseudo, cfg.lambda_ent, cfg.lambda_contr) == (1.0, 1.0, 0.01, 0.1)
    assert (cfg.phi, cfg.psi, cfg.sharpen, cfg.num_views, cfg.momentum) == (0.95, 256, 6.0, 2, 0.9)
    assert (cfg.tau_start, cfg.tau_end, cfg.iterations, cfg.lr, cfg.batch_labeled) == (0.995, 1.0, 150000, 2e-4, 5)
    assert round(cfg.warmup_frac * cfg.iterations) == 2000 == cfg.warmup_iterations
    assert load_config("paper_voc_dlv2").class_balance is False
    dlv3 = load_config("paper_cityscapes_dlv3p")  # inherits through `base:`
    assert (dlv3.arch, dlv3.lr, dlv3.batch_labeled, dlv3.dataset) == ("deeplabv3p_r50", 4e-4, 7, "cityscapes")


def test_overrides_parse_types():
    cfg = load_config("smoke", ["iterations=3", "lambda_contr=1", "crop_size=[32, 48]", "fqf=false", "ratio=1/8"])
    assert cfg.iterations == 3 and cfg.lambda_contr == 1.0 and cfg.crop_size == [32, 48]
    assert cfg.fqf is False and cfg.ratio == "1/8"


def test_unknown_key_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'lambda_contr'"):
        load_config("smoke", ["lambda_cont=0.1"])


@pytest.mark.parametrize("override, message", [
    ("lambda_pseudo=-1", "'lambda_pseudo' = -1.0: must be >= 0"),
    ("psi=0", "'psi' = 0: must be >= 1"),
    ("phi=1.5", "'phi' = 1.5: must be in \\(0, 1\\)"),
    ("iterations=abc", "'iterations' expects int"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_config("smoke", [override])


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(FileNotFoundError, match="camvid_quick"):
        load_config("no_such_profile")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    import os

    from semiseg.config import atomic_write_text

    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_every_key_is_listed_with_its_default_and_meaning(capsys):
    from semiseg.config import FIELDS, describe_keys
    from semiseg.train import main

    main(["--keys"])
    printed = capsys.readouterr().out
    for key, default, meaning in describe_keys():
        assert meaning, f"config key {key!r} has no one-line meaning in the Config class"
        assert f"| `{key}` |" in printed
    assert len(describe_keys()) == len(FIELDS)
