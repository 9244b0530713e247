"""n3jax input pipelines (grain). Import from here; `_*.py` files are private.

  data = make_data(config.data, tokenizer=tok, vocab_size=V, batch_size=B, seed=0)
  batch = next(data.train_iter)      # dict of int32 [B, T]: tokens targets segment_ids positions loss_mask
  state = data.train_iter.get_state(); data.train_iter.set_state(state)   # exact resume
  examples = render_chat(messages, tok)  # SFT: [(ids, loss_mask)], the Nemotron 3 template (`chat_template`)
"""

from n3jax.data import chat_template
from n3jax.data._pipeline import FORMATS, Data, example_fn, make_data, pack_examples, to_model_batch
from n3jax.data._sft import render_chat
from n3jax.data._sources import BUILTIN, BUILTIN_CHAT, open_source, split_source
from n3jax.data._tokenizers import CHAT_SPECIALS, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["BUILTIN", "BUILTIN_CHAT", "ByteTokenizer", "CHAT_SPECIALS", "Data", "FORMATS", "HFTokenizer",
           "chat_template", "example_fn", "load_tokenizer", "make_data", "open_source", "pack_examples", "render_chat",
           "split_source", "to_model_batch"]
