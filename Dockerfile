# Multi-stage build of the `epp` binary into a minimal non-root image.
#   docker build -t epp .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The release profile keeps line tables for local profiling (65 MB); the image keeps the
# symbols, so a profile of a running pod still names functions, and drops the rest (24 MB).
RUN CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked --bin epp

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/epp /epp
# glibc's malloc would otherwise hand freed heap back to the kernel after each long request and
# fault it in again for the next one (~60 page faults per 100k-token request); keeping it costs
# a few MB and saves ~25 % CPU on long prompts (BENCHMARKS.md, "Allocator").
ENV GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
