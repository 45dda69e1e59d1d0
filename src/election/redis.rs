//! Redis lease with fencing. Filled in by the Redis backplane work.
