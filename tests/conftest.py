import copy
import hashlib
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each torch (and each process a test starts) gets its share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_collection_modifyitems(config, items):
    """The slow tier first: pytest-xdist hands tests out in this order, so the long ones start early and the short
    ones fill in at the end (no worker idles through a last long test)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _capture_cache():
    """The suite compiles the same tiny models hundreds of times, and ``torch.export`` is most of each compile. Each
    worker exports a (model class, config, inputs, length, weights) once and hands out copies whose weights are the
    caller's own parameters, as a fresh export's are. Models without an HF config are exported every time."""
    from longctx_compile import capture

    export, programs = capture._export, {}

    def cached(model, wrapper, example, names, max_len):
        config = getattr(model, "config", None)
        if not hasattr(config, "to_json_string"):
            return export(model, wrapper, example, names, max_len)
        weights = hashlib.sha256()
        for name, tensor in wrapper.state_dict(keep_vars=True).items():
            weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        shapes = tuple((k, v.dtype, tuple(v.shape)) for k, v in example.items())
        setting = (config.to_json_string(), getattr(config, "_attn_implementation", None))  # eager or sdpa is not in the JSON
        key = (type(model).__qualname__, setting, tuple(names), max_len, shapes, weights.hexdigest())
        if key not in programs:
            programs[key] = export(model, wrapper, example, names, max_len)
        ep = copy.deepcopy(programs[key])
        own = wrapper.state_dict(keep_vars=True)
        for name in ep.state_dict:
            ep.state_dict[name] = own[name]
        return ep

    capture._export = cached
    yield
    capture._export = export


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dense_artifact(tmp_path_factory):
    """tiny-llama converted to dense and saved once per session (per xdist worker), for tests that only read it."""
    import longctx_compile as lcc

    return lcc.compile("tiny-llama").save(tmp_path_factory.mktemp("shared") / "tiny-llama.lcc")


@pytest.fixture
def hf_folder_with_tokenizer(tmp_path):
    """(folder, words): tiny-llama saved with save_pretrained and a whitespace word-level tokenizer (w2 … w255 are ids 2 … 255)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from longctx_compile.presets import build_preset

    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(2, 256)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "hf"
    build_preset("tiny-llama").save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder, words
