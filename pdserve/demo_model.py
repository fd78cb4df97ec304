"""Write small, random, self-contained models in Hugging Face format.

The demo model is what the tests, the README quickstart and first-time users serve: it
needs no download, loads with plain ``transformers`` (``AutoModelForCausalLM`` /
``AutoTokenizer``), and exercises the same code paths as a real checkpoint: a
``config.json`` of a real architecture, ``model.safetensors``, a byte-level BPE
``tokenizer.json`` and a ChatML chat template.

Tokenizer conventions (ids are the same for every vocab size):

* ``<|endoftext|>`` = 0: pad token and ``bos_token`` (as in Qwen), but the tokenizer never
  prepends it: ``decode(encode(text)) == text`` for any NFC-normalised text (the
  tokenizer NFC-normalises its input, like Qwen2's; see ``build_tokenizer``).
* ``<|im_start|>`` = 1, ``<|im_end|>`` = 2: ChatML delimiters; ``<|im_end|>`` is the EOS.
* If the shipped corpus cannot supply enough merges for ``vocab_size``, the rest of the
  vocabulary is filled with special ``<|reserved_N|>`` tokens, so the tokenizer's length
  always equals the model's ``vocab_size``.

The weights are random, but larger than ``transformers``' default init (see
``_WEIGHT_STD``) so that greedy decoding produces text that changes with the prompt
instead of one token repeated forever.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: the BPE trainer puts its special tokens first.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML, as used by Qwen, without a default system prompt. `content` may be a string, a
# list of OpenAI-style parts (only the text parts are rendered) or null (e.g. an assistant
# turn that only carries tool calls). Every role, `tool` included, gets its own turn.
CHAT_TEMPLATE = (
    # Tools (OpenAI function schemas), when given, go first in a system turn of their own, and an
    # assistant's tool calls follow its text in <tool_call> tags: the Hermes/Qwen2.5 convention.
    # A conversation without tools renders as plain ChatML.
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with the function name and "
    "arguments within <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is not none %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split (GPT-4-like, one digit per token); see build_tokenizer.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Std of the normal init of every parameter but the norms: embeddings, linear weights and
# qwen2's q/k/v biases (transformers uses 0.02).
# Measured on the default models, greedy, 8 prompts x 32-128 tokens: at 0.02-0.04 the tied
# qwen2 model emits one token forever for every prompt (the input embedding dominates the
# residual stream, and tied logits favour the input token); at 0.1 some continuations
# still collapse into long runs; at 0.12 they differ per prompt, with ~100 distinct tokens
# in 128 (qwen3, whose q/k norms flatten attention, still loops now and then); above that,
# the text looks like uniform noise.
_WEIGHT_STD = 0.12


def _config_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]


def _read_corpus() -> str:
    return resources.files("pdserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int, model_max_length: int):
    """Train the demo byte-level BPE on the shipped corpus; returns a ``PreTrainedTokenizerFast``.

    Training is deterministic (the BPE trainer breaks count ties by token id) and takes a
    few tens of milliseconds.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {len(byte_alphabet) + len(SPECIAL_TOKENS)} "
            "(one token per byte plus the special tokens)"
        )

    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline, because transformers 5 loads any model_type=qwen2 tokenizer
    # as Qwen2Tokenizer, which rebuilds the normalizer and pre-tokenizer this way whatever
    # tokenizer.json says. Using it for every arch keeps tokenizer.json and AutoTokenizer
    # in agreement. The price is NFC: only NFC text round-trips exactly.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token even if the corpus never uses it: nothing is ever unknown.
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([_read_corpus()], trainer=trainer)
    # The corpus runs out of merges around 2k tokens; pad so len(tokenizer) == vocab_size.
    missing = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        # Spelled out: older transformers default to True, which turns " ," into ",".
        clean_up_tokenization_spaces=False,
    )


def write_demo_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random ``arch`` model plus tokenizer to ``out_dir`` and return its path.

    The same arguments always produce the same files' contents. ``tie_word_embeddings``
    defaults to the architecture's usual choice (tied for qwen2/qwen3); ``head_dim``
    defaults to ``hidden_size // num_heads``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if head_dim is None and hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads, or head_dim given")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, max_position_embeddings)
    eot, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    if tie_word_embeddings is None:
        tie_word_embeddings = arch in ("qwen2", "qwen3")

    kwargs = {}
    if arch == "mistral":
        # A window as long as the context changes nothing but would make every engine
        # take its sliding-window path; recent Mistral checkpoints ship null too.
        kwargs["sliding_window"] = None
    config = _config_class(arch)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        # Qwen3's config would otherwise default to 128 whatever the hidden size.
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        # Not used by _init_weights; recorded so config.json tells the true init scale.
        initializer_range=_WEIGHT_STD,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        # Build and initialise in float32, cast afterwards: the same seed then gives the
        # same weights (up to rounding) in every dtype.
        dtype="float32",
        **kwargs,
    )
    # from_config runs transformers' own init, which draws from the global RNG; keep the
    # caller's RNG state as it was. _init_weights then overwrites every parameter.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, seed)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
    # safetensors (0.8) creates its file with mode 0600, which breaks serving the model
    # as another user (e.g. mounted into a container); use the umask-derived mode that
    # config.json got.
    (out_dir / "model.safetensors").chmod((out_dir / "config.json").stat().st_mode & 0o777)
    # The template goes into tokenizer_config.json, which every transformers version and
    # most other tools read, rather than into a separate chat_template.jinja.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _set_tokenizer_class(out_dir / "tokenizer_config.json", "PreTrainedTokenizerFast")
    return out_dir


@contextmanager
def _no_progress_bars():
    """transformers 5 draws a "Writing model shards" bar for the demo model's one shard; `serve`
    writes the demo model on its first run, and the bar would land in the server's log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _set_tokenizer_class(path: Path, name: str) -> None:
    # transformers 5 records its class name, TokenizersBackend, which transformers 4 cannot
    # load; both load PreTrainedTokenizerFast (version 5 maps it to TokenizersBackend).
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = name
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _init_weights(model, seed: int) -> None:
    """Re-initialise every parameter from a private generator seeded with ``seed``.

    The weights then depend only on ``seed`` and the parameters' names and shapes: not on
    transformers' init (they are byte-identical under transformers 4.56 and 5.x) nor on
    the global RNG.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() yields a tied lm_head/embedding pair once.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * _WEIGHT_STD)


def default_demo_model_dir() -> Path:
    """Where ``ensure_demo_model`` keeps the shared demo model.

    ``$PDSERVE_CACHE_DIR/demo-model`` if that is set, else
    ``${XDG_CACHE_HOME:-~/.cache}/pdserve/demo-model``.
    """
    if os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(os.environ["PDSERVE_CACHE_DIR"]) / "demo-model"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pdserve" / "demo-model"


def ensure_demo_model(path: str | os.PathLike | None = None) -> Path:
    """Return ``path``, first writing the default demo model there if it is missing.

    ``path`` defaults to ``default_demo_model_dir()``. The model is written into a
    temporary sibling directory and renamed into place, so ``path`` either does not exist
    or holds a complete model, even if the writer crashes or several processes race (the
    first rename wins; the others discard their copy). A crashed writer can leave a
    ``.<name>.tmp-*`` sibling behind; nothing reads it.
    """
    path = Path(path) if path is not None else default_demo_model_dir()
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0700 would stick to the renamed directory.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write_demo_model(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process renamed its copy in first (its directory is not empty).
            if not _is_complete(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_complete(path: Path) -> bool:
    # config.json alone proves nothing for a hand-made directory, but directories this
    # module creates appear atomically, with every file in them.
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()
