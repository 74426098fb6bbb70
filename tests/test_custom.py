"""Custom nn.Module decoders, document masks, arbitrary masks and models the compiler must refuse."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import longctx_compile as lcc
from longctx_compile.errors import LccError, RefusedError
from longctx_compile.testing import assert_equivalent

NANOGPT = Path(__file__).parent / "models" / "nanogpt.py"


@pytest.mark.parametrize("factory", ["eager", "sdpa"])
def test_nanogpt_from_file_factory(factory):
    compiled = lcc.compile(f"{NANOGPT}:{factory}")
    sites = compiled.program.sites()
    assert [s["layer"] for s in sites] == [0, 1]
    assert {s["mask"] for s in sites} == {"causal"}
    assert compiled.program.signature["inputs"] == ["input_ids"]
    # eager slices a 64-row causal buffer to [:T]; export cannot keep T == 64 dynamic, so the bound drops
    max_len = {"eager": 63, "sdpa": 64}[factory]
    assert compiled.program.signature["max_len"] == max_len
    assert bool(compiled.program.signature["notes"]) == (factory == "eager")
    assert_equivalent(compiled.original, compiled, lengths=(1, 5, max_len))


def test_nn_module_through_api():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_mod", NANOGPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.eager()
    compiled = lcc.compile(model)
    assert compiled.program.source["kind"] == "module"
    assert_equivalent(model, compiled)


def test_documents_from_position_resets():
    """Captured without attention_mask, HF masks packed documents; each document must read only itself."""
    compiled = lcc.compile("tiny-llama", attention_mask=False)
    assert {s["mask"] for s in compiled.program.sites()} == {"causal+documents"}
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        packed = compiled(ids, position_ids=pos)
        for start, stop in [(0, 4), (4, 7), (7, 12)]:
            alone = compiled.original(input_ids=ids[:, start:stop], position_ids=pos[:, start:stop]).logits
            torch.testing.assert_close(packed[:, start:stop], alone)


class TinyAttentionLM(nn.Module):
    """One attention layer of 2 heads of dim 8 between an embedding and a head; subclasses say how to attend."""

    def __init__(self):
        super().__init__()
        self.emb, self.qkv, self.head = nn.Embedding(50, 16), nn.Linear(16, 48), nn.Linear(16, 50)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        return self.head(self.attend(q, k, v).transpose(1, 2).reshape(B, T, 16))


class PrefixLM(TinyAttentionLM):
    """Attention with a non-causal prefix of 3 tokens: no structured kind fits, the mask stays a tensor."""

    def attend(self, q, k, v):
        i = torch.arange(q.shape[2])
        keep = (i[None, :] <= i[:, None]) | (i[None, :] < 3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_arbitrary_mask_is_kept_and_exact():
    model = PrefixLM().eval()
    compiled = lcc.compile(model, max_len=32)
    site = compiled.program.sites()[0]
    assert site["mask"] == "arbitrary"
    assert_equivalent(model, compiled, lengths=(1, 4, 9, 32))
    with pytest.raises(RefusedError, match="not a structured kind"):
        lcc.compile(PrefixLM().eval(), max_len=32, allow_arbitrary_masks=False)


class SoftcapAttention(TinyAttentionLM):
    def attend(self, q, k, v):
        s = torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(8) / 30.0) * 30.0
        return s.softmax(-1) @ v


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.head(x)


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids).mean(1))


def test_refusals_name_the_site():
    with pytest.raises(RefusedError, match=r"node softmax.*unsupported operation on the attention scores"):
        lcc.compile(SoftcapAttention().eval(), max_len=16)
    with pytest.raises(RefusedError, match="found no attention"):
        lcc.compile(NoAttention().eval(), max_len=16)
    with pytest.raises(RefusedError, match=r"cannot capture Branchy with torch.export in module"):
        lcc.compile(Branchy().eval(), max_len=16)
    with pytest.raises(LccError, match="not a decoder language model"):
        lcc.compile(Pooled().eval(), max_len=16)
