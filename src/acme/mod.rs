//! ACME (automatic certificates). Not available yet: the configuration
//! rejects `tls = { acme = ... }` with a clear error until it is.
