//! The one part of the `vmig` command line that is also a library: the QMP control protocol of
//! `vmig run --api` ([`qmp`]: its framing, its requests and commands, its server and its
//! client). The binary (`src/main.rs`) uses it from here like every other module of its own;
//! it is a library so that the `qmp` fuzz target (`fuzz/`) and tests can reach the parsing of
//! requests, which needs no VM. Everything else of the command line stays in the binary.

pub mod qmp;
