"""repo.py: which files make up a model, found as Kyutai's own loader finds them.

A Kyutai repo holds the LM, Mimi and the text tokenizer under fixed names; an optional config.json
describes the LM and may rename the files (`moshi_name`, `mimi_name`, `tokenizer_name`,
`mimi_config_name`), exactly like the official `CheckpointInfo.from_hf_repo`. The repo is a
Hugging Face id (downloaded once into the standard cache, when huggingface_hub is installed), a
local directory laid out the same way, or a single LM safetensors file (its folder then plays the
repo). Single files can replace the repo's.

    ckpt = repo.find_checkpoint("kyutai/moshiko-pytorch-bf16")      # paths and configs
    cfg = repo.lm_config_for(ckpt)                                    # a moshi.LMConfig
    params = convert.load_lm(ckpt.moshi, cfg)

sample.py's --hf-repo and train.py's --init-from both go through it. `python repo.py ID_OR_DIR`
prints what it resolves to.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import warnings

import convert
import mimi
import moshi
import ttt
from convert import CheckpointError

DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
MOSHI_NAME = "model.safetensors"   # the default file names in a Kyutai repo (config.json may rename)
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
# How each argument of find_checkpoint reaches us on a command line, so that an error says what to
# change: the flags of Kyutai's own scripts (moshi.server, run_tts), which sample.py keeps.
FLAGS = {"repo": "--hf-repo", "moshi": "--moshi-weight", "mimi": "--mimi-weight", "tokenizer": "--tokenizer",
         "config": "--config", "lora": "--lora-weight"}


@dataclasses.dataclass
class Checkpoint:
    moshi: str                    # path of the LM's safetensors
    mimi: str | None = None       # path of Mimi's safetensors (None when only the LM was asked for)
    tokenizer: str | None = None  # path of the sentencepiece model (idem)
    config: dict | None = None    # config.json without the file names (None: there is none)
    mimi_config: dict | None = None   # the JSON named by `mimi_config_name`, if any (see mimi_config)
    model_type: str = "moshi"         # config.json's (see CONVERSATION_MODEL_TYPES)
    gen_config: dict = dataclasses.field(default_factory=dict)   # its lm_gen_config: LMGen's settings
    lora: tuple | None = None         # (adapters' path, rank, scaling) to merge into the LM (see lora_of)


def find_checkpoint(repo=None, moshi=None, mimi=None, tokenizer=None, config=None, lm_only=False,
                    flags=None, lora=None) -> Checkpoint:
    """Resolve every file like the official loader; explicit files win over the repo's.

    repo: a Hugging Face id, a local repo directory, or an LM .safetensors file (with the
    config.json beside it, if any). None means DEFAULT_REPO, except when all the files are given:
    then no repo is consulted and the LM config is `config`'s, or moshiko's. config: a config.json
    to use instead of the repo's. lm_only: resolve the LM alone (what training starts from), not
    Mimi and the tokenizer. lora: LoRA adapters to merge (see lora_of). flags: {argument: its
    command-line flag} for the error messages (defaults: FLAGS). Problems raise CheckpointError
    saying what is missing and how to give it.
    """
    flags = dict(FLAGS, **(flags or {}))
    repo = repo and os.path.expanduser(repo)                   # no Hugging Face id starts with ~
    if repo and os.path.isfile(repo):                     # one LM file: its folder plays the repo
        moshi, repo = moshi or repo, os.path.dirname(os.path.abspath(repo))
    standalone = repo is None and moshi and (lm_only or (mimi and tokenizer))
    if standalone:                                         # names in `config` are relative to it
        folder = os.path.dirname(os.path.abspath(config)) if config else os.getcwd()
        get = lambda name, optional=False: os.path.join(folder, name)     # noqa: E731
    else:
        get = repo_files(repo or DEFAULT_REPO, flags, lm_only)
    get = with_uris(get, flags, lm_only)
    config_path = config or (None if standalone else get("config.json", optional=True))  # or the repo's
    raw = _read_json(config_path, flags["config"] if config else "config.json") if config_path else {}
    model_type = raw.get("model_type", "moshi")
    if model_type not in CONVERSATION_MODEL_TYPES:
        raise CheckpointError(f"config.json says model_type={model_type!r}; only conversation models run "
                              f"here (model_type 'moshi': Moshiko, Moshika; 'personaplex': PersonaPlex)")
    names = {"moshi": raw.get("moshi_name", MOSHI_NAME), "mimi": raw.get("mimi_name", MIMI_NAME),
             "tokenizer": raw.get("tokenizer_name", TOKENIZER_NAME)}
    given = {"moshi": moshi} if lm_only else {"moshi": moshi, "mimi": mimi, "tokenizer": tokenizer}
    for what, path in {**given, "lora": lora}.items():
        if path is not None and not os.path.isfile(path):
            raise CheckpointError(f"{flags[what]}: no such file {path!r}")
    files = {what: path or get(names[what]) for what, path in given.items()}
    mimi_json_name = None if lm_only else raw.get("mimi_config_name")
    lm_kwargs = {k: v for k, v in raw.items() if k not in NOT_LM_KWARGS}    # file names and tool settings out
    return Checkpoint(**files, config=lm_kwargs if raw else None, model_type=model_type,
                      gen_config=_object_of(raw, "lm_gen_config"), lora=lora_of(raw, lora, get, flags),
                      mimi_config=_read_json(get(mimi_json_name), mimi_json_name) if mimi_json_name else None)


def _object_of(raw: dict, key: str) -> dict:
    """config.json's entry `key`, which must be a JSON object ({} when absent or null)."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"config.json: {key} must be an object {{...}}, got {value!r}")
    return value


def lora_of(raw: dict, given: str | None, get, flags: dict):
    """Adapters to merge, as Kyutai's loader takes them: config.json says "lora": true, names them
    in lora_name or they come by flag (moshi-finetune writes consolidated/{lora.safetensors,
    config.json}), with lora_rank and lora_scaling (Kyutai's defaults 128 and 2). -> (path, rank,
    scaling) or None."""
    named = given or (get(raw["lora_name"]) if raw.get("lora_name") else None)
    if not raw.get("lora"):
        if named:                                    # Kyutai's loader refuses this too
            raise CheckpointError(f'LoRA adapters {named} given, but config.json does not say "lora": '
                                  f'true (pass the config.json written beside them: {flags["config"]})')
        return None
    if not named:
        by_flag = f" or {flags['lora']} FILE" if flags.get("lora") else ""
        raise CheckpointError(f'config.json says "lora": true but names no adapters: give lora_name{by_flag} '
                              "(moshi-finetune writes consolidated/lora.safetensors)")
    return named, raw.get("lora_rank", 128), raw.get("lora_scaling", 2.0)


# Kyutai's repos say "moshi"; NVIDIA's PersonaPlex repo ships only {"model_type": "personaplex",
# "version": "7b-v1"} (no LM settings: lm_config_for reads the architecture off the checkpoint).
CONVERSATION_MODEL_TYPES = ("moshi", "personaplex")


def with_uris(get, flags: dict, lm_only: bool):
    """`get` that also takes the names Kyutai's hf_get takes in a config.json: "file://PATH" (a local
    file) and "hf://OWNER/REPO/FILE" (a file of another Hugging Face repo)."""
    def resolve(name, optional=False):
        if name.startswith("file://"):
            path = name.removeprefix("file://")
            if not os.path.isfile(path):
                raise CheckpointError(f"config.json names {name!r}: no such file")
            return path
        if name.startswith("hf://"):
            owner, repo_name, *rest = name.removeprefix("hf://").split("/")
            return _hub_files(f"{owner}/{repo_name}", flags, lm_only)("/".join(rest), optional)
        return get(name, optional)
    return resolve


def repo_files(repo: str, flags: dict, lm_only: bool):
    """A function `get(name, optional=False) -> path or None` over a local directory or an HF repo.
    In a directory, a missing file names what the folder should hold."""
    if not os.path.isdir(repo):
        # A Hugging Face id is `name` or `owner/name`: anything else was meant as a local path.
        if (os.path.isabs(repo) or repo.startswith((".", "~")) or repo.count("/") > 1
                or repo.endswith(".safetensors")):
            raise CheckpointError(f"{flags['repo']}: no such file or directory {repo!r}")
        return _hub_files(repo, flags, lm_only)
    holds = MOSHI_NAME if lm_only else f"{MOSHI_NAME}, {MIMI_NAME} and {TOKENIZER_NAME}"

    def get_local(name, optional=False):
        path = os.path.join(repo, name)
        if os.path.isfile(path):
            return path
        if optional:
            return None
        raise CheckpointError(f"{repo} has no file {name!r} (a Kyutai repo directory holds {holds}, "
                              f"or config.json naming {'it' if lm_only else 'them'})")
    return get_local


def _hub_files(repo: str, flags: dict, lm_only: bool):
    """repo_files' `get` over a Hugging Face repo (downloaded into the standard cache): each way a
    download can fail becomes a CheckpointError that says what to do instead."""
    try:
        import huggingface_hub
    except ImportError:
        files = "." if lm_only else (f",\n  or pass the files: {flags['moshi']} FILE {flags['mimi']} FILE "
                                     f"{flags['tokenizer']} FILE.")
        raise CheckpointError(
            f"the weights come from the Hugging Face repo {repo!r}, but huggingface_hub is not installed.\n"
            f"  Either `pip install huggingface_hub` (the files are downloaded once, ~16 GB for Moshi),\n"
            f"  or download the repo yourself and pass {flags['repo']} DIR{files}") from None

    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:                              # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    def get_hub(name, optional=False):
        try:
            return huggingface_hub.hf_hub_download(repo, name, etag_timeout=5)
        # offline and not cached: a subclass of the next one, so caught first
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"cannot reach the Hugging Face hub (offline?) for {name!r} of {repo!r}, and it is not in "
                f"the local cache.\n  A local folder works: download the repo once and pass "
                f"{flags['repo']} DIR.") from None
        except EntryNotFoundError:
            if optional:
                return None
            raise CheckpointError(f"the Hugging Face repo {repo!r} has no file {name!r}") from None
        except Exception as e:                       # offline, gated repo, typo in the id, ...
            raise CheckpointError(
                f"could not get {name!r} from the Hugging Face repo {repo!r}:\n  {type(e).__name__}: {e}\n"
                f"  Check the repo id and your connection (gated repos need `huggingface-cli login`),\n"
                f"  or pass a local copy with {flags['repo']} DIR.") from None
    return get_hub


def _read_json(path, what):
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} ({path}): {e}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{what} ({path}) holds a JSON {type(out).__name__}, not an object")
    return out


# ----------------------------------------------------------------------------------------------
# What the configs say. Kyutai's Mimi config JSON (a repo's `mimi_config_name` file) gives a
# mimi.MimiConfig, its config.json a moshi.LMConfig; and back (lm_config_dict), for the files an
# export writes.

# Kyutai's Mimi config JSON (loaders._mimi_config's structure) -> MimiConfig fields; the settings
# the released Mimi fixes are checked, the others are refused by name.
_MIMI_FIELDS = {"seanet": ("dimension", "n_filters", "kernel_size", "last_kernel_size",
                           "residual_kernel_size", "n_residual_layers", "dilation_base", "compress"),
                "transformer": ("num_heads", "num_layers", "dim_feedforward", "context", "layer_scale",
                                "max_period")}
_MIMI_FIXED = {"seanet": {"causal": True, "norm": "none", "pad_mode": "constant", "true_skip": True,
                          "activation": "ELU"},
               "transformer": {"gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
                               "causal": True}}


def mimi_config(d: dict):
    """A repo's Mimi config JSON (its `mimi_config_name` file) -> mimi.MimiConfig."""
    try:
        bad = [f"{part}.{k}={d[part][k]!r}" for part, fixed in _MIMI_FIXED.items()
               for k, v in fixed.items() if d[part].get(k, v) != v]
        if d["transformer"]["d_model"] != d["seanet"]["dimension"]:
            bad.append(f"transformer.d_model={d['transformer']['d_model']} != seanet.dimension")
        if bad:
            raise CheckpointError(f"Mimi config: unsupported settings {', '.join(bad)}")
        kw = {k: d[part][k] for part, names in _MIMI_FIELDS.items() for k in names}
        ratios, q = tuple(int(r) for r in d["seanet"]["ratios"]), d["quantizer"]
        stride = d["sample_rate"] / math.prod(ratios) / d["frame_rate"]      # encoder rate / codec frame rate
        return mimi.MimiConfig(**kw, sample_rate=d["sample_rate"], channels=d["channels"], ratios=ratios,
                               downsample_stride=round(stride), codebook_dim=q["dimension"],
                               codebook_size=q["bins"], num_quantizers=q["n_q"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"Mimi config: missing or bad entry {e}") from None


# The LM's: Kyutai ships an LM as a safetensors file plus, except for the first moshiko/moshika
# repos, a config.json whose keys are `LMModel(**lm_kwargs)` arguments mixed with file names and
# tool settings. `lm_config` turns that into a moshi.LMConfig, resolving what Kyutai's LMModel
# resolves: the depformer inherits the main transformer's settings it does not override.
# Conditioners (Hibiki's quality label, TTS speakers) are not implemented: a config that declares
# them, or a checkpoint that holds `condition_provider.*` / `fuser.*` tensors, loads with a warning
# and the conditioning is ignored, so such a model runs unconditioned.

# file names and tool settings
NOT_LM_KWARGS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                 "version", "lm_gen_config", "tts_config", "stt_config", "model_id", "lora", "lora_rank",
                 "lora_scaling")
# unused by Kyutai too, or (quantize, of a -q8 repo) said by the file itself: its int8 tensors
_DROPPED_LM_KWARGS = ("depformer_causal", "depformer_context", "gradient_checkpointing", "quantize")
_UNSUPPORTED_LM_KWARGS = {"demux_second_text_stream": False, "norm_emb": False, "bias_proj": False,
                          "kv_repeat": 1, "depformer_kv_repeat": 1,
                          "cross_attention": False}
_INHERITED_BY_DEPFORMER = ("num_layers", "gating", "max_period", "layer_scale")


def lm_config(config=None, what: str | None = None):
    """A Kyutai LM config -> moshi.LMConfig. `config`: None (moshiko, Kyutai's built-in default), a
    config.json path, its dict, or an LMConfig (returned as is). Errors name the file (a path) and
    the key: unknown keys, unsupported settings, values of the wrong type."""
    if config is None or isinstance(config, moshi.LMConfig):
        return config or moshi.MOSHIKO
    what = f"LM config {what or ('' if isinstance(config, dict) else config)}".strip()
    if not isinstance(config, dict):
        config = _read_json(config, "LM config")
    kw = _lm_kwargs(config, what, {f.name: f for f in dataclasses.fields(moshi.LMConfig)})
    try:
        if kw.get("ttt") is not None:                    # ours, not Kyutai's: {"layers": [...], ...}
            kw["ttt"] = ttt.TTTConfig(**kw["ttt"])
        return moshi.LMConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: {e}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)       # True is an int to Python, not here


# LMConfig's field types (as written in its annotations) -> does a JSON value have that type
_TYPES = {"int": _is_int, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "float": lambda v: _is_int(v) or isinstance(v, float),
          "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)),
          "ttt.TTTConfig": lambda v: isinstance(v, dict)}


def _lm_kwargs(config: dict, what: str, fields: dict) -> dict:
    """config.json's entries -> LMConfig's keyword arguments, resolved as Kyutai's LMModel resolves
    them (the depformer inherits the main transformer's settings it does not override)."""
    kw = {k: v for k, v in config.items() if k not in NOT_LM_KWARGS + _DROPPED_LM_KWARGS}
    if "demux_second_stream" in kw:                                  # Kyutai renamed it
        kw["demux_second_text_stream"] = kw.pop("demux_second_stream")
    cond = [k for k in ("conditioners", "fuser") if kw.pop(k, None)]
    if cond:
        warnings.warn(f"{what} declares {' and '.join(cond)}: conditioning is not implemented, "
                      "the model will run unconditioned")
    for key, plain in _UNSUPPORTED_LM_KWARGS.items():
        value = kw.pop(key, None)
        if value not in (plain, None):
            raise CheckpointError(f"{what}: {key}={value!r} is not supported (only {plain!r})")
    ff = kw.get("depformer_dim_feedforward")
    if isinstance(ff, list):
        if len(set(ff)) != 1:
            raise CheckpointError(f"{what}: per-step depformer_dim_feedforward {ff} is not supported")
        kw["depformer_dim_feedforward"] = ff[0]
    unknown = sorted(set(kw) - set(fields))
    if unknown:
        raise CheckpointError(f"{what}: unknown keys {unknown}")
    for name, value in kw.items():                   # the type is the first of `int | None`, say
        if value is not None and not _TYPES[fields[name].type.split(" | ")[0]](value):
            raise CheckpointError(f"{what}: {name}={value!r} should be {fields[name].type}")
    for name in _INHERITED_BY_DEPFORMER:
        kw.setdefault("depformer_" + name, kw.get(name, fields[name].default))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}   # the tuple[int, ...] fields


# LMConfig fields that are ours, not Kyutai's kwargs (its LMModel would refuse them): a config.json
# holds them only where they differ from their default.
_OUR_LM_FIELDS = ("ttt", "kv_ring")


def lm_config_dict(cfg) -> dict:
    """moshi.LMConfig -> Kyutai lm kwargs (what a config.json holds; `LMModel(**d)` accepts it, unless
    the model has TTT layers or streams with NVIDIA's KV ring: then a "ttt" entry holds their
    ttt.TTTConfig and "kv_ring" says "personaplex", which only we read)."""
    d = dataclasses.asdict(cfg)
    for name in _OUR_LM_FIELDS:
        if getattr(cfg, name) == getattr(moshi.LMConfig, name):       # the field's default
            del d[name]
    return json.loads(json.dumps(d))                  # tuples -> lists, at any depth


def lm_config_for(ckpt: Checkpoint, log=None):
    """The moshi.LMConfig to load `ckpt.moshi` with (convert.load_lm): config.json's, or, where the
    repo has none (or one that does not describe the LM, like PersonaPlex's), Kyutai's built-in
    moshiko config with as many depformer outputs as the checkpoint has heads (16 for PersonaPlex,
    whose own loader also ignores config.json). A PersonaPlex checkpoint (model_type "personaplex",
    or 16 depformer heads) streams with NVIDIA's KV ring, as its own code does, unless config.json
    names a kv_ring. `log(message)`, if given, hears when the heads decide."""
    heads = sum(1 for k in convert.SafeTensorsFile(ckpt.moshi).keys()
                if re.fullmatch(r"linears\.\d+\.weight", k))
    persona = ckpt.model_type == "personaplex" or heads == moshi.PERSONAPLEX.dep_q
    ring = {"kv_ring": moshi.PERSONAPLEX.kv_ring} if persona else {}
    if ckpt.config and "dim" in ckpt.config:
        return lm_config(dict(ring, **ckpt.config), "config.json")
    if heads in (0, moshi.MOSHIKO.dep_q) and not persona:
        return moshi.MOSHIKO
    heads = heads or moshi.MOSHIKO.dep_q
    if log:
        log(f"no LM config: moshiko's, with dep_q={heads} as the checkpoint has {heads} depformer heads"
            + (", and PersonaPlex's KV ring" if persona else ""))
    return dataclasses.replace(moshi.MOSHIKO, dep_q=heads, **ring)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", nargs="?", help="a Hugging Face id, a repo folder or an LM file")
    ap.add_argument("--lm-only", action="store_true", help="only the LM (what train.py --init-from reads)")
    args = ap.parse_args(argv)
    try:
        ckpt = find_checkpoint(args.repo, lm_only=args.lm_only)
    except CheckpointError as e:
        raise SystemExit(f"repo.py: {e}")
    for name, value in dataclasses.asdict(ckpt).items():
        print(f"{name}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
