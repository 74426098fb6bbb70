"""KV-cache programs and generation: equal to Hugging Face ``generate`` and to full recomputation."""

import pytest
import torch
from decode_steps import check_decode_steps, left_padded

import longctx_compile as lcc
from longctx_compile.errors import LccError

PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 9, 11, 13], [12, 8], [200, 201, 3, 4, 5]]


def hf_greedy(model, prompts, new):
    ids, mask = left_padded(prompts)
    model.generation_config.eos_token_id = None  # generate exactly `new` tokens, as lcc does without stop ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-gemma", "tiny-phi"])
def test_greedy_tokens_equal_hf_generate(preset):
    compiled = lcc.compile(preset)
    expected = hf_greedy(compiled.original, PROMPTS, 32)
    assert compiled.generate(PROMPTS, max_new_tokens=32) == expected
    assert compiled.generate(PROMPTS, max_new_tokens=32, cache="growing") == expected


def test_artifact_generates_after_loading(tmp_path):
    compiled = lcc.compile("tiny-mistral")
    path = compiled.save(tmp_path / "m.lcc")
    loaded = lcc.load(path)
    # the steps run from model.pt2's graph: the artifact stores no copy of the model as step programs
    assert loaded.manifest["programs"] == {"model": "model.pt2"} and loaded.manifest["derived"] == {"kv_cache": ["prefill", "decode", "static"]}
    assert sorted(p.name for p in path.iterdir()) == ["graphs.json", "lcc.json", "model.pt2"]
    assert loaded.manifest["cache"]["kv_heads"] == [2, 2] and loaded.manifest["cache"]["head_dims"] == [16, 16]
    expected = hf_greedy(compiled.original, PROMPTS, 12)
    assert loaded.generate(PROMPTS, max_new_tokens=12) == expected
    assert loaded.generate(PROMPTS, max_new_tokens=12, cache="growing") == expected
    # exported on demand, a step program takes model.pt2's weights as an input instead of carrying a copy
    from longctx_compile.artifact import read_model_program as artifact_program
    from longctx_compile.forms import derive

    decode = derive(artifact_program(path, loaded.manifest), "kv_cache.decode")
    assert not decode.state_dict and not decode.constants


def test_decode_logits_equal_full_recompute():
    """Both cache modes, stepped by hand: every step's logits equal recomputing the whole sequence."""
    check_decode_steps(lcc.compile("tiny-llama"), PROMPTS, 6, prefix_views=False)


def test_sampling_is_seeded_and_stop_ids_end_rows():
    compiled = lcc.compile("tiny-llama")
    first = compiled.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert first == compiled.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert first != compiled.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    greedy = compiled.generate(PROMPTS, max_new_tokens=10)
    stop = greedy[0][3]
    stopped = compiled.generate(PROMPTS, max_new_tokens=10, stop_ids=[stop])
    for row, full in zip(stopped, greedy, strict=True):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    steps = []
    compiled.generate(PROMPTS, max_new_tokens=4, stream=steps.append)
    assert [[s[row] for s in steps] for row in range(3)] == [g[:4] for g in greedy]


def test_top_k_one_is_greedy():
    compiled = lcc.compile("tiny-qwen2")
    assert compiled.generate(PROMPTS, max_new_tokens=6, do_sample=True, top_k=1, seed=0) == compiled.generate(PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize(
    "prompts,kwargs,message",
    [
        ([[1, 2], []], {}, "empty prompt"),
        ([[1, 2, 300]], {}, "token id 300 is outside the vocabulary 0..255"),
        ([list(range(200)) * 3], {}, "exceeds the program's maximum length 512"),
        ([[1, 2]], {"temperature": 0.0, "do_sample": True}, "temperature > 0"),
        ([[1, 2]], {"cache": "paged"}, "unknown cache mode 'paged'"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_bad_generation_input(prompts, kwargs, message):
    compiled = lcc.compile("tiny-llama")
    with pytest.raises(LccError, match=message):
        compiled.generate(prompts, **{"max_new_tokens": 4, **kwargs})


def test_non_causal_programs_refuse_a_cache():
    class Bidirectional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)

        def forward(self, input_ids):
            x = self.embed(input_ids)[:, None]
            return self.head(torch.nn.functional.scaled_dot_product_attention(x, x, x)[:, 0])

    compiled = lcc.compile(Bidirectional(), max_len=16)
    with pytest.raises(LccError, match="its attention is not causal"):
        compiled.generate([[1, 2]], max_new_tokens=2)


def lcc_cli(*args):
    import lcc_cli as cli

    result = cli.run(*args)
    return result.returncode, result.stdout, result.stderr


def test_cli_generate_with_the_saved_tokenizer(tmp_path, hf_folder_with_tokenizer):
    """save_pretrained model + a tokenizer beside it → lcc convert → lcc generate --prompt, end to end."""
    import json

    folder, words = hf_folder_with_tokenizer
    out = tmp_path / "m.lcc"
    assert lcc_cli("convert", str(folder), "-o", str(out))[0] == 0
    rc, stdout, stderr = lcc_cli("generate", str(out), "--prompt", "w5 w7 w9", "-n", "8", "--json")
    assert rc == 0, stderr
    (row,) = json.loads(stdout)
    expected = lcc.compile(str(folder)).generate([[5, 7, 9]], max_new_tokens=8)[0]
    assert row["prompt_ids"] == [5, 7, 9] and row["new_ids"] == expected
    assert row["text"].split() == [words[i] for i in expected]
    for cache in ("growing", "static"):
        rc, stdout, _ = lcc_cli("generate", str(out), "--prompt-ids", "5,7,9", "-n", "8", "--cache", cache)
        assert rc == 0 and stdout.split() == [words[i] for i in expected]
    for args, message in [
        (["--prompt-ids", "1,2,999"], "outside the vocabulary"),
        (["--prompt-ids", ""], "empty prompt"),
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", ",".join(["3"] * 510), "-n", "8"], "exceeds the program's maximum length"),
    ]:
        rc, _, stderr = lcc_cli("generate", str(out), *args)
        assert rc == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


def test_cli_prompt_text_needs_a_tokenizer(dense_artifact):
    out = dense_artifact
    rc, _, stderr = lcc_cli("generate", str(out), "--prompt", "hello")
    assert rc == 2 and "no tokenizer" in stderr and len(stderr.strip().splitlines()) == 1
    rc, stdout, _ = lcc_cli("generate", str(out), "--prompt-ids", "1,2,3", "-n", "5")
    assert rc == 0 and stdout.strip() == ",".join(map(str, lcc.load(out).generate([[1, 2, 3]], max_new_tokens=5)[0]))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-phi"])
def test_prefill_runs_the_lm_head_on_the_last_position_only(preset):
    """The slice goes before the LM head's linear, so a long prompt never materialises [B, T, vocab]."""
    from longctx_compile.fx import is_call

    graph = lcc.compile(preset).steps.prefill.graph_module.graph
    head = [n for n in graph.nodes if is_call(n, torch.ops.aten.linear)][-1]
    assert is_call(head.args[0], torch.ops.aten.slice) and head.args[0].args[1:3] == (1, -1)
