"""Tokens for training: documents -> packed token windows -> global, sharded batches indexed by step."""

from jaxscale.data.loader import Batch, GlobalBatchLoader, StepRows, eval_batches
from jaxscale.data.packing import ExampleBatches, TokenBatches
from jaxscale.data.segments import DocumentRows
from jaxscale.data.sources import iter_documents
from jaxscale.data.store import TokenStore, open_store, prepare
from jaxscale.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "Batch",
    "ByteTokenizer",
    "DocumentRows",
    "ExampleBatches",
    "GlobalBatchLoader",
    "HFTokenizer",
    "StepRows",
    "TokenBatches",
    "TokenStore",
    "Tokenizer",
    "build_tokenizer",
    "eval_batches",
    "iter_documents",
    "open_store",
    "prepare",
]
