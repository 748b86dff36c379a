"""A tiny EDJE model in the authors' checkpoint layout, and the reference computations it is checked against.

The reference side is built only from ``transformers`` (``SiglipVisionModel``,
``BertForMaskedLM``, ``BertPooler``, the tokenizer, the SigLIP image
processor) and an adapter forward written here from ``shared/docs/edje.md``
(exact GELU, the queries attend once over the patch tokens, no self-attention
among them). Nothing here imports the project's model code.

The checkpoint is what ``shahafwa/EDJE``'s ``train.py`` saves: ``torch.save``
of ``{"model": state_dict, "optimizer", "config", "epoch", "global_step"}``.
Their state dict was made with transformers 4.x, whose ``SiglipVisionModel``
nests the vision tower as ``vision_model``: hence ``vision_encoder.vision_model.``
in front of the (5.x, flat) names of the model built here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# the vision tower: a tiny SigLIP, and the timm architecture that matches it exactly
VISION = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TIMM_BACKBONE = "vit_base_patch16_siglip_224"
TIMM_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 8}
M = 8  # adapter queries (not the preset's 64: the indexer must read m from the checkpoint)
MLP_HIDDEN = 8192  # the authors' multimodal_projection_hidden_dim (also the indexer's default)
HIDDEN = 384  # the language model's width = the stored tokens' width
VOCAB = 30523  # bert-base-uncased's 30,522 + <image>
IMAGE_TOKEN = "<image>"
MAX_TEXT_CONTEXT_LENGTH = 64  # the authors' constant


@dataclass
class AuthorsModel:
    siglip: nn.Module  # transformers SiglipVisionModel
    adapter: dict[str, torch.Tensor]  # the authors' adapter parameter names, without vision_projection.
    lm: nn.Module  # transformers BertForMaskedLM
    head: nn.Sequential  # BertPooler, Linear(384, 1)


def _perturb(module: nn.Module, gen: torch.Generator) -> None:
    """Give every vector (norms, biases) its own values, so a swapped name cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build(seed: int = 0) -> AuthorsModel:
    from transformers import BertConfig, BertForMaskedLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.bert.modeling_bert import BertPooler

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    siglip = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=256,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        initializer_range=0.2,
    )
    lm = BertForMaskedLM(cfg).eval()
    head = nn.Sequential(BertPooler(cfg), nn.Linear(HIDDEN, 1)).eval()
    for mod in (siglip, lm, head):
        _perturb(mod, gen)
    d, h = VISION["hidden_size"], MLP_HIDDEN
    shapes = {
        "query": (1, M, d),
        "key.weight": (d, d),
        "key.bias": (d,),
        "value.weight": (d, d),
        "value.bias": (d,),
        "attention.in_proj_weight": (3 * d, d),
        "attention.in_proj_bias": (3 * d,),
        "attention.out_proj.weight": (d, d),
        "attention.out_proj.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h),
        "mlp.fc2.bias": (d,),
        "projection.weight": (HIDDEN, d),
        "projection.bias": (HIDDEN,),
    }
    adapter = {k: torch.randn(s, generator=gen) * (0.05 if "fc2" in k else 0.2) for k, s in shapes.items()}
    adapter["layernorm.weight"] += 1.0
    return AuthorsModel(siglip, adapter, lm, head)


def rounded(model: AuthorsModel, dtype: torch.dtype) -> AuthorsModel:
    """The model a checkpoint in ``dtype`` holds, as float32 (bf16 values upcast): what the reference must run."""
    if dtype == torch.float32:
        return model
    out = copy.deepcopy(model)
    with torch.no_grad():
        for mod in (out.siglip, out.lm, out.head):
            for p in mod.parameters():
                p.copy_(p.to(dtype).float())
    out.adapter = {k: v.to(dtype).float() for k, v in out.adapter.items()}
    return out


def authors_state_dict(model: AuthorsModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``MultimodalPretrainModel.state_dict()``'s names (as saved with transformers 4.x), tensors in ``dtype``."""
    sd = {}
    sd.update({f"vision_encoder.vision_model.{k}": v for k, v in model.siglip.state_dict().items()})
    sd.update({f"vision_projection.{k}": v for k, v in model.adapter.items()})
    sd.update({f"language_model.{k}": v for k, v in model.lm.state_dict().items()})
    sd["text_embeddings.weight"] = model.lm.get_input_embeddings().weight
    sd.update({f"classification_head.{k}": v for k, v in model.head.state_dict().items()})
    # training-only parts: a stand-in for the frozen SigLIP teacher and the text projection
    sd["clip.logit_scale"] = torch.tensor([2.3])
    sd["clip.vision_model.post_layernorm.weight"] = torch.ones(VISION["hidden_size"])
    sd["text_projection.weight"] = torch.zeros(16, HIDDEN)
    sd["text_projection.bias"] = torch.zeros(16)
    return {k: v.detach().to(dtype).clone() if v.is_floating_point() else v.clone() for k, v in sd.items()}


def save_checkpoint(path, state: dict, **extra) -> str:
    """``train.py``'s file: the model, a real AdamW state, the YAML config dict, counters."""
    params = [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    config = {
        "siglip_path": "google/siglip2-large-patch16-384",
        "language_model_path": "microsoft/MiniLM-L12-H384-uncased",
        "multimodal_projection_hidden_dim": MLP_HIDDEN,
        "num_compressed_tokens": M,
        "pretrain_files": ["a.json", "b.json"],
        "init_lr": 3e-4,
        "finetune": False,
        "experiment": {"backend": "comet", "run_name": None},
    }
    torch.save(
        {"model": state, "optimizer": opt.state_dict(), "config": config, "epoch": 3, "global_step": 1234, **extra},
        path,
    )
    return str(path)


# -- reference computations -------------------------------------------------------------------


def hf_pixels(images) -> torch.Tensor:
    """The Hugging Face SigLIP processor's pixels (the PIL one: transformers 4.x's SiglipImageProcessor), built
    offline with the authors' settings: squash-resize, bilinear, rescale 1/255, mean = std = 0.5."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = VISION["image_size"]
    proc = SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return proc(images=list(images), return_tensors="pt")["pixel_values"]


def reference_adapter(p: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int, eps: float = 1e-6):
    """edje.md's adapter with plain tensor ops: one cross-attention of the m queries over x, then
    H + MLP(LayerNorm(H)) with the exact (erf) GELU, then the projection to 384."""
    b, n, d = x.shape
    hd = d // num_heads
    k_in = x @ p["key.weight"].T + p["key.bias"]
    v_in = x @ p["value.weight"].T + p["value.bias"]
    wq, wk, wv = p["attention.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attention.in_proj_bias"].chunk(3)
    q = (p["query"].expand(b, -1, -1) @ wq.T + bq).view(b, -1, num_heads, hd).transpose(1, 2)
    k = (k_in @ wk.T + bk).view(b, n, num_heads, hd).transpose(1, 2)
    v = (v_in @ wv.T + bv).view(b, n, num_heads, hd).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1) @ v
    h = att.transpose(1, 2).reshape(b, -1, d) @ p["attention.out_proj.weight"].T + p["attention.out_proj.bias"]
    y = F.layer_norm(h, (d,), p["layernorm.weight"], p["layernorm.bias"], eps=eps)
    y = F.gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"], approximate="none")
    h = h + y @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return h @ p["projection.weight"].T + p["projection.bias"]


@torch.no_grad()
def reference_tokens(model: AuthorsModel, images) -> torch.Tensor:
    """SigLIP's last_hidden_state on the processor's pixels -> the adapter: float32 [B, M, 384]."""
    hidden = model.siglip(pixel_values=hf_pixels(images)).last_hidden_state
    return reference_adapter(model.adapter, hidden, VISION["num_attention_heads"])


def authors_tokenizer(folder: str):
    """The tokenizer as ``MultimodalPretrainModel`` makes it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": IMAGE_TOKEN})


@torch.no_grad()
def reference_scores(model: AuthorsModel, tokenizer, captions: list[str], tokens: torch.Tensor) -> torch.Tensor:
    """The authors' compute_logits on cleaned captions and given image tokens [B, m, 384]."""
    b, m, _ = tokens.shape
    enc = tokenizer(
        captions,
        [IMAGE_TOKEN * m] * b,
        padding=True,
        truncation="only_first",
        max_length=MAX_TEXT_CONTEXT_LENGTH + m,
        return_tensors="pt",
    )
    ids = enc.pop("input_ids")
    embeds = model.lm.get_input_embeddings()(ids)
    mask = (ids == tokenizer.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, tokens.to(embeds.dtype))
    last = model.lm(inputs_embeds=embeds, **enc, output_hidden_states=True).hidden_states[-1]
    return model.head(last).view(-1)
