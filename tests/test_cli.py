"""The command line, end to end on the tiny model: what the README tells a user to run."""

import json

from ddpo_lite import __version__
from ddpo_lite.cli import main


def test_train_tiny_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "tiny",
            "--set",
            "num_epochs=1",
            "--set",
            "sample.num_steps=2",
            "--set",
            "sample.num_batches_per_epoch=1",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert "done: 1 epochs" in capsys.readouterr().out


def test_presets_and_version(capsys):
    assert main(["presets"]) == 0
    assert "tiny" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_reward_is_a_one_line_error(tmp_path, capsys):
    code = main(
        ["train", "--preset", "tiny", "--set", "reward.name='nope'", "--output", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown reward 'nope'" in err and "jpeg_compressibility" in err
    assert "Traceback" not in err
