"""python -m lab.train: a lab arch at the size matched to a PRISM config; and compare.py's
scoring of a whole split."""
import json
import math

import numpy as np
import pytest
import torch

import train as T
from checkpoint import load_model
from configurator import read_config_file
from lab import compare
from lab import train as lab_train
from lab.variants import sizes_like_prism
from model import build_model


def test_a_lab_arch_trains_at_the_size_matched_to_the_default_config(compact_data, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = lab_train.main(["--arch=gpt2", f"--data_dir={compact_data}", "--max_iters=2",  # flags
                              "--eval_interval=2", "--eval_iters=1", "--device=cpu"])  # only
    assert summary["arch"] == "gpt2" and summary["iters"] == 2 and math.isfinite(summary["val_loss"])
    prism_args = T.parse_args([T.default_config()])[1]
    vocab_size = json.loads((compact_data / "meta.json").read_text())["vocab_size"]
    prism = build_model("prism", **prism_args, vocab_size=vocab_size).get_num_params()
    assert abs(summary["params"] / prism - 1) <= 0.05
    out_dir = read_config_file(T.default_config())["out_dir"] + "_gpt2"  # PRISM's stays free
    assert summary["out_dir"] == out_dir and load_model(tmp_path / out_dir / "ckpt.pt").arch == "gpt2"


def test_the_config_gives_the_sizes_and_the_flags_the_rest(tmp_path, capsys):
    cfg, model_args = lab_train.parse_args([T.default_config(), "--arch=gemma3", "--n_head=8",
                                            "--max_iters=7", "--out_dir=mine"])
    prism_args = T.parse_args([T.default_config()])[1]
    assert model_args == {**sizes_like_prism("gemma3", prism_args), "n_head": 8}
    assert (cfg.arch, cfg.max_iters, cfg.out_dir) == ("gemma3", 7, "mine")
    for argv, words in (([T.default_config()], "--arch=NAME is required"),
                        ([T.default_config(), "--arch=gpt2", "--expansion=1"], "unknown key 'expansion'"),
                        ([T.default_config(), "--arch=gpt2", "--vocab_size=3"], "meta.json")):
        with pytest.raises(SystemExit) as exit_info:
            lab_train.main(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    (tmp_path / "odd.py").write_text("n_layer = 3\n")
    with pytest.raises(T.TrainError, match="no preset has a PRISM"):
        lab_train.parse_args([str(tmp_path / "odd.py"), "--arch=gpt2"])


def test_evaluate_split_reads_every_window_once_and_weighs_them_equally():
    seen = []

    class Stub(torch.nn.Module):  # loss = mean target id: the split's mean is known exactly
        def forward(self, x, y):
            seen.extend(x[:, 0].tolist())
            return None, y.double().mean()

    data = np.arange(1000, dtype=np.uint16)
    loss = compare.evaluate_split(Stub(), data, block_size=16, batch_size=5, device="cpu")
    assert seen == [16 * w for w in range(62)]  # (1000 − 1) // 16 non-overlapping windows
    assert loss == pytest.approx(np.arange(1, 62 * 16 + 1).mean())  # a short last batch counts less
    with pytest.raises(compare.CompareError, match="no window"):
        compare.evaluate_split(Stub(), data[:16], block_size=16, batch_size=5, device="cpu")
