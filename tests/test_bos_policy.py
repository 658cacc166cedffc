"""One BOS policy across analyses and the dashboard (issue 19): a sequence starts with BOS exactly when
the tokenizer puts one there or ``prepend_bos`` asks for it, never twice, never stripped.

Checked on the ids each analysis really feeds (``Analysis.inputs`` of a stored run, the dashboard's
``live.encode``) for two tokenizers built from the same vocabulary, one adding BOS and one not; the
reference is the tokenizer's own output for the text.
"""
from __future__ import annotations

import json

import pytest

from headscope.analyses.base import run_analysis
from headscope.app import live
from headscope.probe import Probe

from .helpers import as_loaded, tiny_llama, write_tiny_llama_gguf

TEXT = "the cat sat on the mat and the dog sat on the log"
BOS = 1


@pytest.fixture(scope="module", params=[False, True], ids=["tokenizer-adds-none", "tokenizer-adds-bos"])
def lm(request, tmp_path_factory):
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("bos")
    write_tiny_llama_gguf(d / "tok.gguf", add_bos=request.param)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file="tok.gguf")
    assert (tok(TEXT).input_ids[0] == BOS) == request.param
    model = tiny_llama(len(tok), seed=0, layers=2, heads=4, hidden=32, intermediate=64, max_positions=128,
                       bos_token_id=BOS, eos_token_id=2)
    return as_loaded(model, tok, "tiny", path=str(d))


def expected(lm, ids: list[int], prepend: bool) -> list[int]:
    """The policy, stated on plain lists: ``ids`` are what the tokenizer gives (with its BOS, if any)."""
    return [BOS] + ids if prepend and ids[0] != BOS else ids


def fed(lm, tmp_path, name, options, data=None) -> list[int]:
    probe = Probe(lm)
    run = run_analysis(name, lm=lm, probe=probe, out=tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}",
                       progress=False, options=options, data=data)
    return live.example_input_ids(run, json.loads((run.path / "examples.jsonl").read_text().splitlines()[0])["id"],
                                  lm, probe)


@pytest.mark.parametrize("prepend", [False, True])
def test_every_entry_point_starts_with_bos_by_the_same_rule(lm, tmp_path, prepend):
    adds = lm.tokenizer(TEXT).input_ids[0] == BOS
    want_bos = adds or prepend
    text_ids = expected(lm, lm.tokenizer(TEXT).input_ids, prepend)
    # the dashboard (Inspect) and sinks / fai on the same text feed the same ids
    assert live.encode(lm, TEXT, prepend) == text_ids
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    assert fed(lm, tmp_path, "sinks", {"T": 0, "prepend_bos": prepend}, data) == text_ids
    assert fed(lm, tmp_path, "fai", {"prepend_bos": prepend}, data) == text_ids
    # sequences an analysis builds itself follow the same rule
    ind = fed(lm, tmp_path, "induction", {"n_examples": 1, "seq_len": 5, "prepend_bos": prepend})
    assert len(ind) == 10 + want_bos and (ind[0] == BOS) == want_bos
    assert ind[-5:] == ind[-10:-5]
    rnd = fed(lm, tmp_path, "sinks", {"input": "random", "n_examples": 1, "T": 12, "prepend_bos": prepend})
    assert len(rnd) == 12 and (rnd[0] == BOS) == want_bos and BOS not in rnd[1:]
    # Gu's repeated-token probe: BOS only when asked for
    rep = fed(lm, tmp_path, "sinks", {"input": "repeated", "n_examples": 1, "T": 12, "prepend_bos": prepend})
    assert len(rep) == 12 and (rep[0] == BOS) == prepend and len(set(rep[int(prepend):])) == 1
