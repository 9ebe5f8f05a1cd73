//! The language-model kernel (feature `lm`): a llama-family transformer on candle.
