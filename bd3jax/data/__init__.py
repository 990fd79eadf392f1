"""Data: documents -> tokenizer -> concatenated-and-wrapped rows -> grain iterators, per process.

Sources (`config.data.source`): the bundled demo corpus, text/JSONL files, ArrayRecord text
files, tfds (`tfds.data_source`) and Hugging Face datasets; or pre-tokenised shards
(`config.data.prepared_dir`, written by `python -m bd3jax.data.prepare`).
Tokenizers: sentencepiece, GPT-2 BPE, BERT WordPiece, all serializable into checkpoints.
"""

from bd3jax.data.build import DataBundle, build_data
from bd3jax.data.distributed import local_batch_size, process_shard
from bd3jax.data.documents import load_documents
from bd3jax.data.pipeline import WRAP_STYLES, eval_batches, make_train_iterator, tokenize_documents, wrap_documents
from bd3jax.data.records import TokenRows
from bd3jax.data.sources import demo_documents, read_documents, split_documents
from bd3jax.data.stream import TokenStream
from bd3jax.data.tokenizers import (GPT2Tokenizer, SentencePieceTokenizer, Tokenizer, WordPieceTokenizer,
                                    load_or_train_tokenizer, load_tokenizer, tokenizer_from_bytes,
                                    train_sentencepiece)

__all__ = [
    "DataBundle", "GPT2Tokenizer", "SentencePieceTokenizer", "TokenRows", "TokenStream", "Tokenizer",
    "WRAP_STYLES", "WordPieceTokenizer", "build_data", "demo_documents", "eval_batches",
    "load_documents", "load_or_train_tokenizer", "load_tokenizer", "local_batch_size",
    "make_train_iterator", "process_shard", "read_documents", "split_documents", "tokenize_documents",
    "tokenizer_from_bytes", "train_sentencepiece", "wrap_documents",
]
