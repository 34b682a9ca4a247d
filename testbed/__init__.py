"""What the tests and the benchmarks (ops/bench) both drive, outside the
product: tox-bootstrapd and our relay as processes, a private DHT, toxcore
clients through libtoxcore, and the friends scenario between two of them.
Neither the product packages nor anything they import use it."""
