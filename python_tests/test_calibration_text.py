"""The mixed calibration text of codec v2 (splitkernels/eval/calibration_text.py)."""
import pytest
import torch

from splitkernels.eval import calibration_text, load_text
from splitkernels.eval.calibration_text import KINDS, calibration_windows, kind_text


def byte_ids(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def test_every_kind_has_text_of_its_own_here():
    texts = {kind: kind_text(kind) for kind in KINDS}
    assert texts["prose"] == load_text("botchan")
    assert "def " in texts["code"] and "import " in texts["code"]
    assert len(texts["docs"]) > 100_000 and texts["docs"] not in texts["code"]
    with pytest.raises(ValueError, match="kind must be one of"):
        kind_text("poetry")


def test_windows_take_turns_among_the_kinds_and_prose_starts_late():
    windows, used = calibration_windows(byte_ids, 7 * 64, 64, prose_start=1000)
    assert [w.numel() for w in windows] == [64] * 7
    prose, code, docs = (byte_ids(kind_text(k)) for k in KINDS)
    expect = [prose[1000:1064], code[:64], docs[:64], prose[1064:1128], code[64:128], docs[64:128], prose[1128:1192]]
    for got, want in zip(windows, expect):
        assert torch.equal(got, want)
    assert used == {"prose": [1000, 192], "code": [0, 128], "docs": [0, 128]}


def test_short_calibration_is_one_window_and_partial_windows_are_dropped():
    windows, _ = calibration_windows(byte_ids, 40, 64, prose_start=0)
    assert [w.numel() for w in windows] == [40]
    windows, _ = calibration_windows(byte_ids, 150, 64, prose_start=0)
    assert [w.numel() for w in windows] == [64, 64]


def test_a_missing_kind_gives_its_turns_to_the_others(monkeypatch):
    original = calibration_text.kind_text
    monkeypatch.setattr(calibration_text, "kind_text", lambda kind: "" if kind == "code" else original(kind))
    windows, used = calibration_windows(byte_ids, 4 * 64, 64, prose_start=0)
    assert len(windows) == 4 and set(used) == {"prose", "docs"} and used["prose"][1] + used["docs"][1] == 256


def test_bad_arguments_and_too_little_text_say_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match="tokens must be an int >= 2"):
        calibration_windows(byte_ids, 1, 64, prose_start=0)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        calibration_windows(byte_ids, 128, True, prose_start=0)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        calibration_windows(byte_ids, 128, 64, prose_start=0, kinds=("prose", "tweets"))
    monkeypatch.setattr(calibration_text, "kind_text", lambda kind: "short text")
    with pytest.raises(ValueError, match="hold fewer than 128 tokens in windows of 64"):
        calibration_windows(byte_ids, 128, 64, prose_start=0)


def test_config_for_model_rejects_empty_or_too_short_windows():
    from splitkernels.codec.spec import config_for_model

    spec = {"kind": "v2", "bits": 4.0}
    for windows in ([], [torch.tensor([5])], [torch.arange(8), torch.tensor([], dtype=torch.long)]):
        with pytest.raises(ValueError, match="calibration windows must be a non-empty sequence"):
            config_for_model(spec, None, 1, windows)  # checked before the model is touched
