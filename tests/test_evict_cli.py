"""``lcc convert --to evict``, ``lcc train-indexers``, ``verify`` and ``generate`` on an evict artifact, and their refusals."""

from __future__ import annotations

import json
import subprocess

import lcc_cli
import pytest
import torch

import longctx_compile as lcc
from longctx_compile.forms.evict.train import TrainConfig, Trainer, train
from longctx_compile.runtime.data import token_stream

SMALL = ["--opt", "sinks=2", "--opt", "window=4", "--opt", "budget=24"]


def run(*args):
    result = lcc_cli.run(*args)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("evict") / "model.lcc"
    result = run("convert", "tiny-llama", "--to", "evict", *SMALL, "-o", str(path))
    assert result.returncode == 0, result.stderr
    return path


def indexer_weights(path):
    loaded = lcc.load(path)
    names = [n for site in loaded.signature["evict"]["params"].values() for n in site.values()]
    return {n: loaded.program.state_dict[n].detach().clone() for n in names}, loaded.signature["evict"]["trained"]


def test_training_lowers_the_kl_and_writes_the_weights_into_the_artifact(artifact, tmp_path):
    path = tmp_path / "model.lcc"
    subprocess.run(["cp", "-r", str(artifact), str(path)], check=True)
    before, _ = indexer_weights(path)
    result = run("train-indexers", str(path), "--steps", "30", "--memory-steps", "10", "--length", "96", "--lr", "1e-2", "--save-every", "10")
    assert result.returncode == 0, result.stderr
    after, trained = indexer_weights(path)
    assert trained["indexer"]["last_loss"] < 0.7 * trained["indexer"]["first_loss"]  # the indexer learns the model's attention
    assert trained["memory"]["steps"] == 10 and all(not torch.equal(before[n], after[n]) for n in before)
    assert not (tmp_path / "model.lcc.train-indexers.pt").exists()  # the finished run's checkpoint is gone
    verified = run("verify", str(path))  # prompts (half of each length) ≤ 16 < budget 24: nothing is evicted, the dense model
    assert verified.returncode == 0 and "WITHIN TOLERANCE" in verified.stdout
    generated = run("generate", str(path), "--prompt-ids", "1,2,3,4,5", "-n", "6", "--json")
    assert generated.returncode == 0 and len(json.loads(generated.stdout)[0]["new_ids"]) == 6


def test_lcc_train_has_an_indexers_mode_that_writes_a_new_artifact(artifact, tmp_path):
    """``lcc train --objective indexers`` runs the same two stages as train-indexers, into a new artifact: the
    source's indexers stay as they were, the new one's are trained and the run is recorded."""
    before, _ = indexer_weights(artifact)
    args = ["--data", "synthetic", "--objective", "indexers", "--steps", "20", "--seq-len", "96", "--lr", "1e-2"]
    result = run("train", str(artifact), *args, "-o", str(tmp_path / "trained.lcc"))
    assert result.returncode == 0, result.stderr
    after, trained = indexer_weights(tmp_path / "trained.lcc")
    assert all(torch.equal(before[n], indexer_weights(artifact)[0][n]) for n in before)  # the source is untouched
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert trained["indexer"]["last_loss"] < trained["indexer"]["first_loss"]
    record = lcc.load(tmp_path / "trained.lcc").signature["train"][-1]
    assert record["objective"] == "indexers" and record["stages"]["memory"]["steps"] == 20
    refused = run("train", str(tmp_path / "trained.lcc"), "--data", "synthetic", "--objective", "nope", "-o", str(tmp_path / "x.lcc"))
    assert refused.returncode == 2 and "indexers (an evict artifact's)" in refused.stderr


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(artifact, tmp_path):
    loaded = lcc.load(artifact)
    cfg = TrainConfig(steps=6, memory_steps=4, length=48)
    data = token_stream(None, 256, 48, 1, 0)
    whole = train(Trainer(loaded.program, loaded.signature), data, cfg)
    checkpoint = tmp_path / "run.pt"

    class Stop(Exception):
        pass

    def interrupt(stage, step, total, loss):
        if stage == "memory" and step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(Trainer(loaded.program, loaded.signature), data, cfg, checkpoint, save_every=1, progress=interrupt)
    resumed = train(Trainer(loaded.program, loaded.signature), data, cfg, checkpoint, torch.load(checkpoint, weights_only=True), save_every=1)
    assert resumed["done"].keys() == whole["done"].keys()
    for name, value in whole["trained"].items():
        torch.testing.assert_close(resumed["trained"][name], value)


def test_refusals_are_one_line(artifact, tmp_path):
    dense = tmp_path / "dense.lcc"
    assert run("convert", "tiny-llama", "-o", str(dense)).returncode == 0
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"tokens": [1, 2, 3]}) + "\n")
    cases = [
        (["train-indexers", str(dense)], "no eviction indexers to train"),
        (["train", str(dense), "--data", "synthetic", "--objective", "indexers", "-o", str(tmp_path / "o.lcc")], "this artifact's form is dense"),
        (["train-indexers", str(artifact), "--data", str(short), "--length", "64"], "holds 3 tokens, fewer than --length 64"),
        (["train-indexers", str(artifact), "--length", "4"], "must exceed sinks + window"),
        (["train-indexers", str(artifact), "--data", str(tmp_path / "none.jsonl")], "no training data file"),
        (["train-indexers", str(artifact), "--resume"], "no checkpoint"),
        (["convert", "tiny-llama", "--to", "evict", "--opt", "budget=6", "--opt", "sinks=2", "--opt", "window=4", "-o", str(tmp_path / "x")], "must exceed"),
        (["convert", "tiny-llama", "--to", "evict", "--opt", "budget=1.25", "-o", str(tmp_path / "y")], "a ratio lies in [0, 1)"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
