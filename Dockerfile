# Multi-stage build of the `epp` binary into a minimal non-root image.
#   docker build -t epp .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin epp

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/epp /epp
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
