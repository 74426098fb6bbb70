"""The lcc command line: the main job works, and bad input is one line, a non-zero exit, nothing written."""

import json
import re
from pathlib import Path

import lcc_cli
import pytest


def lcc(*args, cwd=None):
    result = lcc_cli.run(*args, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


def test_convert_inspect_diff_verify(tmp_path):
    out = tmp_path / "m.lcc"
    rc, stdout, _ = lcc("convert", "tiny-mistral", "--to", "dense", "-o", str(out), "--opt", "attn=eager", "--verify")
    assert rc == 0 and "PASS" in stdout and "window(8)" in stdout
    assert json.loads((out / "lcc.json").read_text())["equivalence"]["passed"] is True
    rc, stdout, _ = lcc("inspect", str(out), "--json")
    info = json.loads(stdout)
    assert rc == 0 and len(info["sites"]) == 2 and info["ops"]["longctx.attention"] == 2
    rc, stdout, _ = lcc("diff", str(out), "--format", "json", "--layer", "0")
    assert rc == 0 and json.loads(stdout)["summary"]["added"] == 1
    rc, _, _ = lcc("diff", str(out), "--format", "html", "-o", str(tmp_path / "d.html"))
    assert rc == 0 and (tmp_path / "d.html").read_text().startswith("<!doctype html>")
    rc, stdout, _ = lcc("verify", str(out))
    assert rc == 0 and "PASS" in stdout
    rc, stdout, _ = lcc("--help")
    for command in ("convert", "inspect", "diff", "verify", "passes", "targets"):
        assert command in stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "no/such/path"], "no such model"),
        (["convert", "EMPTY"], "has no config.json"),
        (["convert", "tiny-nope"], "unknown preset"),
        (["convert", "tiny-llama", "--to", "sparse9"], "unknown form"),
        (["convert", "tiny-llama", "--target", "h900"], "unknown target"),
        (["verify", "tiny-llama", "--target", "h900"], "unknown target"),
        (["convert", "tiny-llama", "--target", "rtx4090", "--opt", "fwd_block_n=128", "--opt", "fwd_stages=4"], "bytes of shared memory"),
        (["convert", "tiny-llama", "--target", "h100", "--opt", "bwd_block_m=48"], "powers of two"),
        (["convert", "tiny-llama", "--opt", "fallback=maybe"], "expected one of none, reference"),
        (["convert", "WIDE", "--target", "h100"], "head dim 320 is larger than"),
        (["convert", "tiny-llama", "--opt", "bogus=1"], "unknown --opt 'bogus'"),
        (["convert", "tiny-llama", "--opt", "max_len=abc"], "expected an integer"),
        (["convert", "tiny-llama", "--opt", "novalue"], "expected key=value"),
        (["convert", "tiny-llama", "-o", "EXISTS"], "already exists"),
        (["convert", "BRANCHY"], "cannot capture Branchy"),
        (["inspect", "CORRUPT"], "not valid JSON"),
        (["verify", "CORRUPT"], "not valid JSON"),
        (["diff", "CORRUPT"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EXISTS").mkdir()
    (tmp_path / "EXISTS" / "keep.txt").write_text("x")
    (tmp_path / "CORRUPT").mkdir()
    (tmp_path / "CORRUPT" / "lcc.json").write_text("{")
    (tmp_path / "branchy.py").write_text(
        "import torch\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.e = torch.nn.Embedding(10, 4); self.h = torch.nn.Linear(4, 10)\n"
        "    def forward(self, input_ids):\n"
        "        x = self.e(input_ids)\n"
        "        return self.h(x * 2 if x.sum() > 0 else x)\n"
        "def make():\n"
        "    return Branchy()\n"
    )
    (tmp_path / "wide.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom test_targets import WideHeads\ndef make():\n    return WideHeads()\n"
    )
    placeholders = {"BRANCHY": str(tmp_path / "branchy.py") + ":make", "WIDE": str(tmp_path / "wide.py") + ":make"}
    args = [placeholders.get(a, a) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, stderr = lcc(*args, cwd=tmp_path)
    assert rc != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "EXISTS" / "keep.txt").read_text() == "x"


def test_targets_and_triton_lowering(tmp_path):
    rc, stdout, _ = lcc("targets")
    assert rc == 0
    for name in ("cpu", "interpret", "a100-40gb", "a100-80gb", "a800", "h100", "h200", "l40s", "rtx4090", "b200"):
        assert name in stdout
    rc, stdout, _ = lcc("targets", "--json")
    assert rc == 0 and json.loads(stdout)["h100"]["smem_per_block"] == 232448
    out = tmp_path / "m.lcc"
    rc, stdout, _ = lcc("convert", "tiny-llama", "--target", "a100-80gb", "--opt", "fwd_block_m=64", "-o", str(out))
    assert rc == 0 and "target a100-80gb" in stdout
    rc, stdout, _ = lcc("inspect", str(out), "--json")
    site = json.loads(stdout)["sites"][0]
    assert site["kernel"] == "longctx.flash_attention/triton" and site["config"]["fwd"][0] == 64 and site["config"]["source"] == "override"
    rc, stdout, _ = lcc("inspect", str(out))
    assert rc == 0 and "triton" in stdout and "64x" in stdout


def test_a_commands_exit_status_reaches_the_shell(tmp_path):
    """``lcc launch`` exits with its ranks' failure (typer.Exit's status was dropped, so a failed launch exited 0)."""
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    rc, _, stderr = lcc("launch", "--nproc", "1", str(script))
    assert rc == 3 and "rank 0 failed: exit status 3" in stderr
    script.write_text("from longctx_compile.errors import LccError\nraise LccError('the group has 2 ranks, the program 3')\n")
    rc, _, stderr = lcc("launch", "--nproc", "2", str(script))  # every rank fails alike: one line, not a traceback per rank
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and re.search(r"rank [01] failed: the group has 2 ranks, the program 3$", lines[0]), stderr
    script.write_text("import sys\nopen(sys.argv[1], 'w').write('ran')\n")
    rc, _, _ = lcc("launch", "--nproc", "1", str(script), str(tmp_path / "ran"))
    assert rc == 0 and (tmp_path / "ran").read_text() == "ran"


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "tiny-llama", "--bogus"], "the options of 'lcc convert' are --dtype, --force, --onnx, --opt"),
        (["convrt", "tiny-llama"], "Did you mean 'convert'"),
        (["frob"], "the commands are "),
        (["verify", "x.lcc", "--nproc", "3"], "the options of 'lcc verify' are"),
        (["convert", "tiny-llama", "--to"], "requires an argument"),
    ],
)
def test_usage_errors_are_one_line_naming_the_choices_with_exit_2(args, message):
    rc, _, stderr = lcc(*args)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "internal error" not in stderr, stderr


def test_version():
    from longctx_compile import __version__

    rc, stdout, _ = lcc("--version")
    assert rc == 0 and stdout.strip() == f"lcc {__version__}"


def test_inspect_checks_the_checksums_and_a_missing_manifest_is_named(tmp_path):
    import longctx_compile as lcc_api

    path = lcc_api.compile("tiny-llama").save(tmp_path / "m.lcc")
    rc, stdout, _ = lcc("inspect", str(path))
    assert rc == 0 and "tiny-llama" in stdout
    program = path / "model.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    program.write_bytes(bytes(data))
    rc, _, stderr = lcc("inspect", str(path))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and "model.pt2 does not match its checksum" in lines[0]
    (path / "lcc.json").unlink()
    rc, _, stderr = lcc("inspect", str(path))
    assert rc != 0 and "an lcc artifact without its manifest (lcc.json)" in stderr


SLOW_MODEL = """
import pathlib, time
def make():
    pathlib.Path(__file__).with_name("started").write_text("1")  # the test sends its signal once this exists
    time.sleep(60)
"""


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_convert_says_so_writes_nothing_and_exits_with_the_signals_code(tmp_path, signame, code):
    """Also where SIGINT was ignored when lcc started (a shell's background job): it used to run on and exit 0."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    out = tmp_path / "m.lcc"
    ignore = signal.SIGINT if signame == "SIGINT" else signal.SIGTERM
    command = [sys.executable, "-c", "from longctx_compile.cli.app import main; main()", "convert", f"{tmp_path / 'slow.py'}:make", "-o", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(ignore, signal.SIG_IGN))
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code and stderr.strip() == "interrupted; nothing written", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.py", "started"]


def test_a_write_sweeps_the_temporary_folders_a_killed_writer_left(tmp_path):
    import os

    import longctx_compile as lcc_api

    dead = tmp_path / ".m.lcc.tmp-999999999-abcd1234"  # no such pid
    old_style = tmp_path / ".m.lcc.tmp-abcd1234"
    live = tmp_path / f".m.lcc.tmp-{os.getppid()}-abcd1234"  # a writer that is still running: left alone
    for folder in (dead, old_style, live):
        folder.mkdir()
        (folder / "model.pt2").write_bytes(b"x" * 1000)
    lcc_api.compile("tiny-llama").save(tmp_path / "m.lcc")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.lcc", live.name])


MARKED_MODEL = """
import pathlib
from longctx_compile.presets import build_preset
def make():
    pathlib.Path(__file__).with_name("loaded").write_text("1")
    return build_preset("tiny-llama")
"""


@pytest.mark.parametrize(
    "form,option,message",
    [
        ("msa", "pool=0", "a pooled chunk holds at least 1 token"),
        ("msa", "topk=-1", "expected a number of chunks"),
        ("hsa", "chunk=0", "a chunk holds at least 1 key"),
        ("hsa", "window=-1", "0 or more"),
        ("evict", "budget=1.5", "a ratio lies in [0, 1)"),
        ("evict", "interval=0", "evict every 1 or more"),
        ("ring", "degree=1", "ring degree must be at least 2"),
        ("sp", "hybrid=2x2 degree=3", "makes 4 ranks, but degree=3"),
        ("ulysses", "degree=3", "the model: 4 query heads are not divisible by the sequence-parallel degree 3"),  # from its config
    ],
)
def test_bad_option_values_are_refused_before_the_model_loads_or_before_capture(tmp_path, form, option, message):
    (tmp_path / "marked.py").write_text(MARKED_MODEL)
    options = [arg for pair in option.split() for arg in ("--opt", pair)]
    rc, _, stderr = lcc("convert", f"{tmp_path / 'marked.py'}:make", "--to", form, *options, "-o", str(tmp_path / "m.lcc"))
    assert rc == 2 and message in stderr, stderr
    if "the model" not in message:
        assert not (tmp_path / "loaded").exists()  # refused before the (possibly minutes-long) load and capture
    else:  # the heads come from the model's config: loaded, refused before the capture
        assert "layer 0" not in stderr


def test_a_non_utf8_prompt_and_an_unwritable_onnx_path_are_one_line(tmp_path):
    import longctx_compile as lcc_api

    path = lcc_api.compile("tiny-llama").save(tmp_path / "m.lcc")
    rc, _, stderr = lcc("generate", str(path), "--prompt", "\udcff\udcfe abc", "-n", "2")  # what Python makes of bytes that are not UTF-8
    assert rc == 2 and stderr.strip() == "error: --prompt is not UTF-8 text; re-encode it, or give token ids with --prompt-ids"
    blocked = tmp_path / "file"
    blocked.write_text("x")  # a file where the output's folder should be
    rc, _, stderr = lcc("export-onnx", str(path), "-o", str(blocked / "m.onnx"))  # checked before the export, not after it
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and f"cannot write '{blocked / 'm.onnx'}'" in stderr, stderr


def test_folders_that_are_not_decoder_lm_checkpoints_are_refused(tmp_path):
    """An encoder-decoder, and a checkpoint without the LM head's weights (a base model's), used to convert with a random head."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, T5ForConditionalGeneration

    t5 = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
    T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    rc, _, stderr = lcc("convert", str(tmp_path / "t5"), "-o", str(tmp_path / "a.lcc"))
    assert rc == 2 and "is an encoder-decoder model (t5)" in stderr
    llama = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("lm_head")}
    save_file(tensors, weights, metadata={"format": "pt"})
    rc, _, stderr = lcc("convert", str(tmp_path / "base"), "-o", str(tmp_path / "b.lcc"))
    assert rc == 2 and "lacks weights its LlamaForCausalLM needs (lm_head.weight)" in stderr, stderr
    for name, is_decoder in (("encoder", False), ("decoder", True)):
        bert = AutoConfig.for_model(
            "bert", hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64, is_decoder=is_decoder
        )
        AutoModelForCausalLM.from_config(bert).save_pretrained(tmp_path / name)  # BertLMHeadModel, every weight saved
    rc, _, stderr = lcc("convert", str(tmp_path / "encoder"), "-o", str(tmp_path / "c.lcc"))
    assert rc == 2 and "every attention sees the whole sequence (full+padding): an encoder" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "decoder", "encoder", "t5"]
    rc, _, stderr = lcc("convert", str(tmp_path / "decoder"), "-o", str(tmp_path / "d.lcc"))  # BERT made causal is a decoder
    assert rc == 0, stderr


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=32, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden = vocab_size, hidden
"""

REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyLM(PreTrainedModel):  # no sdpa support declared
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.head = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return (self.head(self.embed(input_ids)),)
"""


def test_remote_code_models_name_the_option_they_need(tmp_path):
    import subprocess
    import sys

    package = tmp_path / "remote_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (package / "modeling_tiny.py").write_text(REMOTE_MODEL)
    save = (
        "from remote_pkg.configuration_tiny import TinyConfig\n"
        "from remote_pkg.modeling_tiny import TinyLM\n"
        "TinyConfig.register_for_auto_class()\n"
        "TinyLM.register_for_auto_class('AutoModelForCausalLM')\n"
        "TinyLM(TinyConfig()).save_pretrained('remote')\n"
    )
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True, capture_output=True)  # a folder with its own code
    rc, _, stderr = lcc("convert", str(tmp_path / "remote"), "-o", str(tmp_path / "r.lcc"))
    assert rc == 2 and "runs its own model code; to allow it, pass --opt trust_remote_code=true" in stderr, stderr
    rc, _, stderr = lcc("convert", str(tmp_path / "remote"), "-o", str(tmp_path / "r.lcc"), "--opt", "trust_remote_code=true")
    assert rc == 2 and "the model's code does not support sdpa attention; convert with --opt attn=eager" in stderr, stderr
