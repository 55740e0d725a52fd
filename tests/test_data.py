import pytest
import torch

from aqsearch.data import TokenSet, calib_eval_sets, file_ids, sample_ids
from aqsearch.errors import AqError
from aqsearch.models import load_model


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir))


def test_windows_and_hash():
    ids = torch.arange(100)
    a = TokenSet.from_ids(ids, 10, 3, "x")
    assert a.windows.tolist()[1] == list(range(10, 20)) and a.n_tokens == 30
    assert a.hash == TokenSet.from_ids(ids.clone(), 10, 3, "y").hash  # content, not name
    assert a.hash != TokenSet.from_ids(ids + 1, 10, 3, "x").hash
    spread = TokenSet.from_ids(ids, 10, 3, "x", spread=True)
    assert spread.windows[:, 0].tolist() == [0, 40, 90]  # window starts 0, round(4.5)=4, 9
    with pytest.raises(AqError, match="not enough"):
        TokenSet.from_ids(ids, 10, 11, "x")


def test_file_sets_and_crlf(loaded, text_file, other_text_file):
    calib, ev = calib_eval_sets(loaded, str(other_text_file), str(text_file), calib_windows=2, calib_seqlen=16,
                                eval_tokens=64, seqlen=32)
    assert calib.windows.shape == (2, 16) and ev.windows.shape == (2, 32)
    assert "\r" not in loaded.tokenizer.decode(ev.windows[0])


def test_same_text_refused_unless_split(loaded, text_file):
    with pytest.raises(AqError, match="same text"):
        calib_eval_sets(loaded, str(text_file), str(text_file), calib_windows=2, calib_seqlen=16, eval_tokens=64, seqlen=32)
    calib, ev = calib_eval_sets(loaded, str(text_file), str(text_file), calib_windows=2, calib_seqlen=16,
                                eval_tokens=64, seqlen=32, split=0.5)
    ids = file_ids(str(text_file), loaded.tokenizer)
    cut = ids.numel() // 2
    assert torch.equal(ev.windows[0], ids[cut : cut + 32])  # evaluation starts at the cut
    assert int(calib.windows[-1, 0]) == int(ids[(cut // 16 - 1) * 16])  # calibration ends before it
    assert calib.hash != ev.hash and ev.source.endswith("[0.5:]")


def test_bad_data(loaded, tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AqError, match="empty"):
        calib_eval_sets(loaded, None, str(empty), eval_tokens=64, seqlen=32)
    with pytest.raises(AqError, match="not found"):
        calib_eval_sets(loaded, None, str(tmp_path / "nope.txt"), eval_tokens=64, seqlen=32)
    with pytest.raises(AqError, match="not enough"):
        calib_eval_sets(loaded, None, str(text_file), eval_tokens=10**6, seqlen=32)


def test_model_samples_seeded_and_cached(loaded):
    a = sample_ids(loaded.model, loaded.tokenizer, 40, 20, seed=3, fingerprint=loaded.fingerprint)
    b = sample_ids(loaded.model, loaded.tokenizer, 40, 20, seed=3, fingerprint=loaded.fingerprint + "x")
    assert a.shape == (40,) and torch.equal(a, b)  # same seed, recomputed: identical
    c = sample_ids(loaded.model, loaded.tokenizer, 40, 20, seed=4, fingerprint=loaded.fingerprint)
    assert not torch.equal(a, c)
    calib, ev = calib_eval_sets(loaded, calib_windows=2, calib_seqlen=20, eval_tokens=40, seqlen=20)
    assert calib.hash != ev.hash and ev.source.startswith("model-samples")
