//! Redis backplane (fred). Filled in by the Redis backplane work.
