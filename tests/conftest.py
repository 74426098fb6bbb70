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
