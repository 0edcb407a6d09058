"""Engine configuration: dataclasses built once from CLI flags, `LLM(...)` options or a checkpoint.

`ModelConfig` normalises the supported Hugging Face config families (Llama, Qwen2, Qwen3, Phi-3, Gemma 2,
Gemma 3, GPT-J, GPT-NeoX, GPT-2) into one set of field names, so model code and the engine never re-read
`config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gptserve.errors import ModelLoadError

# Hugging Face `model_type` -> our architecture name.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
}

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn a user-facing dtype name ("fp16", "bfloat16", ...) into a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16") from None


@dataclass
class ModelConfig:
    """Shape and hyper-parameters of a decoder-only transformer, architecture-neutral."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True
    activation: str = "gelu_new"
    attention_bias: bool = False  # on q, k, v and the output projection
    qkv_bias: bool = False  # on q, k and v only (Qwen2)
    mlp_bias: bool = False
    # Mixture of experts (Mixtral, Qwen3-MoE): experts per MoE layer, experts chosen per token, whether the
    # chosen experts' weights are renormalised to sum to one, each expert's inner size. Layers listed in
    # mlp_only_layers, and those off the decoder_sparse_step, have a dense MLP of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    # Gemma 2/3: attention scale (query_pre_attn_scalar ** -0.5), soft-capping of attention scores and of
    # the final logits, each layer's kind ("sliding_attention" | "full_attention"; also Qwen2/Qwen3 with
    # use_sliding_window), the window of the sliding ones (of every layer when layer_types is empty:
    # Mistral, Mixtral, Phi-3) and their own RoPE base (Gemma 3).
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dictionary."""
        model_type = cfg.get("model_type")
        arch = ARCHITECTURES.get(model_type or "")
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={cfg.get('architectures')}); supported: {sorted(ARCHITECTURES)}"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        common = dict(bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, hf_config=cfg)
        try:
            if arch == "llama":
                return cls(
                    architecture=arch,
                    **_llama_shape(cfg, max_positions=2048, norm_eps=1e-6),
                    rope_theta=_rope_theta(cfg, 10000.0),
                    rope_scaling=_rope_scaling(cfg),
                    tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                    activation=cfg.get("hidden_act", "silu"),
                    attention_bias=cfg.get("attention_bias", False),
                    mlp_bias=cfg.get("mlp_bias", False),
                    # Mistral: each query sees only the last `sliding_window` positions (itself included).
                    sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
                    **common,
                )
            if arch in ("qwen2", "qwen3"):
                return cls._from_qwen(arch, cfg, common)
            if arch == "phi3":
                return cls._from_phi3(cfg, common)
            if arch in ("mixtral", "qwen3_moe"):
                return cls._from_moe(arch, cfg, common)
            if arch in ("gemma2", "gemma3"):
                return cls._from_gemma(arch, cfg, common)
            if arch == "gptj":
                heads = cfg["n_head"]
                hidden = cfg["n_embd"]
                return cls(
                    architecture=arch,
                    vocab_size=cfg["vocab_size"],
                    hidden_size=hidden,
                    num_layers=cfg["n_layer"],
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=hidden // heads,
                    intermediate_size=cfg.get("n_inner") or 4 * hidden,
                    max_position_embeddings=cfg.get("n_positions", 2048),
                    norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                    rotary_dim=cfg.get("rotary_dim") or hidden // heads,
                    rope_theta=10000.0,
                    tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                    activation=cfg.get("activation_function", "gelu_new"),
                    **common,
                )
            if arch == "gpt_neox":
                heads = cfg["num_attention_heads"]
                hidden = cfg["hidden_size"]
                head_dim = hidden // heads
                return cls(
                    architecture=arch,
                    vocab_size=cfg["vocab_size"],
                    hidden_size=hidden,
                    num_layers=cfg["num_hidden_layers"],
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=head_dim,
                    intermediate_size=cfg["intermediate_size"],
                    max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                    norm_eps=cfg.get("layer_norm_eps", 1e-5),
                    rotary_dim=int(head_dim * cfg.get("rotary_pct", _neox_partial_rotary(cfg))),
                    rope_theta=_rope_theta(cfg, cfg.get("rotary_emb_base", 10000.0)),
                    rope_scaling=_rope_scaling(cfg),
                    tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                    use_parallel_residual=cfg.get("use_parallel_residual", True),
                    activation=cfg.get("hidden_act", "gelu"),
                    attention_bias=cfg.get("attention_bias", True),
                    **common,
                )
            # gpt2
            heads = cfg["n_head"]
            hidden = cfg["n_embd"]
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                num_layers=cfg["n_layer"],
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=cfg.get("n_inner") or 4 * hidden,
                max_position_embeddings=cfg.get("n_positions", 1024),
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                activation=cfg.get("activation_function", "gelu_new"),
                attention_bias=True,
                mlp_bias=True,
                **common,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json for {model_type} lacks the field {e.args[0]!r}") from None

    @classmethod
    def _from_qwen(cls, arch: str, cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        """Qwen2 (Qwen2.5) and Qwen3: Llama's fields; Qwen2 biases q/k/v, Qwen3 norms each q and k head.
        A config with use_sliding_window gives its sliding layers (`layer_types`) the window."""
        types = _qwen_layer_types(cfg)
        return cls(
            architecture=arch,
            **_llama_shape(cfg, max_positions=32768, norm_eps=1e-6),
            rope_theta=_rope_theta(cfg, 10000.0),
            rope_scaling=_rope_scaling(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            activation=cfg.get("hidden_act", "silu"),
            attention_bias=arch == "qwen3" and cfg.get("attention_bias", False),
            qkv_bias=arch == "qwen2",
            # With use_sliding_window, the window applies to the sliding_attention layers only.
            layer_types=types,
            sliding_window=cfg["sliding_window"] if types else None,
            **common,
        )

    @classmethod
    def _from_phi3(cls, cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        """Phi-3 (and Phi-4-mini): Llama's math with q|k|v and gate|up already fused in the checkpoint,
        LongRoPE ("su") scaling, in some partial rotary, in some a sliding window on every layer."""
        shape = _llama_shape(cfg, max_positions=4096, norm_eps=1e-5)
        partial = cfg.get("partial_rotary_factor") or _rope_parameters(cfg).get("partial_rotary_factor", 1.0)
        scaling = _rope_scaling(cfg)
        if scaling is not None and scaling["rope_type"] in ("su", "longrope"):
            original = scaling.get("original_max_position_embeddings")
            original = original or cfg.get("original_max_position_embeddings")
            scaling = dict(scaling, rope_type="longrope", original_max_position_embeddings=original)
        return cls(
            architecture="phi3",
            **{**shape, "rotary_dim": int(shape["head_dim"] * partial)},
            sliding_window=cfg.get("sliding_window"),
            rope_theta=_rope_theta(cfg, 10000.0),
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            activation=cfg.get("hidden_act", "silu"),
            **common,
        )

    @classmethod
    def _from_gemma(cls, arch: str, cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        """Gemma 2 and Gemma 3 (text): local (sliding-window) and global layers, attention scaled by
        query_pre_attn_scalar; Gemma 2 soft-caps attention scores, both may soft-cap the final logits;
        Gemma 3's local layers have their own RoPE base."""
        num_layers = cfg["num_hidden_layers"]
        pattern = 2 if arch == "gemma2" else cfg.get("sliding_window_pattern") or 6
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
        ]
        params = _rope_parameters(cfg)
        if "full_attention" in params:  # per layer kind, as transformers 5 writes Gemma 3's
            full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
            theta = float(full.get("rope_theta", 1000000.0))
            local_theta = float(local.get("rope_theta", 10000.0))
            kind = full.get("rope_type") or full.get("type") or "default"
            scaling = None if kind == "default" else dict(full, rope_type=kind)
        else:
            theta = _rope_theta(cfg, 10000.0 if arch == "gemma2" else 1000000.0)
            local_theta = float(cfg.get("rope_local_base_freq") or 10000.0)
            scaling = _rope_scaling(cfg)
        return cls(
            architecture=arch,
            **_llama_shape(cfg, max_positions=8192, norm_eps=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
            attention_bias=cfg.get("attention_bias", False),
            attention_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
            attn_logit_softcap=cfg.get("attn_logit_softcapping") if arch == "gemma2" else None,
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            layer_types=list(types),
            sliding_window=cfg.get("sliding_window"),
            local_rope_theta=local_theta if arch == "gemma3" else theta,
            **common,
        )

    @classmethod
    def _from_moe(cls, arch: str, cfg: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        """Mixtral (Llama's attention) and Qwen3-MoE (Qwen3's, per-head q/k norms): a sparse MoE MLP.

        Mixtral's optional sliding window, and Qwen3-MoE's when use_sliding_window is set, apply to every
        layer, as in transformers."""
        mixtral = arch == "mixtral"
        window = cfg.get("sliding_window") if mixtral or cfg.get("use_sliding_window") else None
        return cls(
            architecture=arch,
            **_llama_shape(cfg, max_positions=32768, norm_eps=1e-5 if mixtral else 1e-6),
            rope_theta=_rope_theta(cfg, 1000000.0 if mixtral else 10000.0),
            rope_scaling=_rope_scaling(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            activation=cfg.get("hidden_act", "silu"),
            attention_bias=not mixtral and cfg.get("attention_bias", False),
            num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            norm_topk_prob=mixtral or cfg.get("norm_topk_prob", False),
            moe_intermediate_size=cfg["intermediate_size"] if mixtral else cfg["moe_intermediate_size"],
            mlp_only_layers=[] if mixtral else list(cfg.get("mlp_only_layers") or []),
            decoder_sparse_step=1 if mixtral else cfg.get("decoder_sparse_step") or 1,
            sliding_window=window or None,
            **common,
        )

    def sliding_window_for(self, layer: int) -> int | None:
        """The window layer `layer` attends within: `sliding_window` on every layer when `layer_types` is
        empty, else on its sliding_attention layers only; None for full attention."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has a sparse MoE MLP (else a dense one), as transformers decides."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def _llama_shape(cfg: dict[str, Any], max_positions: int, norm_eps: float) -> dict[str, Any]:
    """The shape fields every Llama-style config names alike (`num_hidden_layers`, `num_key_value_heads`,
    `head_dim` or hidden / heads, `rms_norm_eps`, ...); the defaults are the family's. Rotary over the
    whole head."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", max_positions),
        norm_eps=cfg.get("rms_norm_eps", norm_eps),
        rotary_dim=head_dim,
    )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    params = cfg.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    return float(cfg.get("rope_theta") or _rope_parameters(cfg).get("rope_theta") or default)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or _rope_parameters(cfg) or None
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return None if kind == "default" else dict(scaling, rope_type=kind)


def _qwen_layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's kind in a Qwen2/Qwen3 config, as transformers reads it, or [] when none slides: no
    layer unless use_sliding_window and a window are set; then `layer_types`, or every layer from
    max_window_layers on."""
    if not (cfg.get("use_sliding_window") and cfg.get("sliding_window")):
        return []
    num_layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    return list(types) if "sliding_attention" in types else []


def _neox_partial_rotary(cfg: dict[str, Any]) -> float:
    return float(_rope_parameters(cfg).get("partial_rotary_factor", 0.25))


@dataclass
class CacheConfig:
    """Paged KV cache: block size and the byte budget (or block count) of the one allocation."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = default budget for the device
    num_blocks: int | None = None  # overrides the byte budget (tests)
    enable_prefix_caching: bool = True
    dtype: torch.dtype | None = None  # of the cached K and V; None: the activations' dtype


@dataclass
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    async_scheduling: bool = False  # launch the next decode step before this step's tokens reach the host


@dataclass
class EngineConfig:
    """Everything the engine core needs, resolved once."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
