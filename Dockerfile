# Ambit's image: `ambit` (agent, CA, waypoint, CLI: one binary, the entrypoint) and `ambit-cni`
# (copied onto each node by `ambit cni install`), on an empty base with only what they load:
# the dynamic loader, the shared libraries `ldd` names, and the CA certificates (a waypoint
# fetching an https jwksUri trusts the system's roots). No shell, no package manager.
#
# `cargo xtask image` builds it with podman (or buildah) and writes an OCI archive; docs/install.md
# says how to push it. Its root filesystem is always assembled by the same code,
# `cargo xtask image --rootfs-only DIR` (xtask/src/image.rs), in one of two places:
#
#   ROOTFS=source (the default; CI with a registry): the `build` stage, FROM a Rust image
#     (BUILDER) given the pinned nightly (NIGHTLY, with rust-src) next to its stable, compiles
#     the binaries for release (bpf-linker comes from crates.io through `cargo xtask setup`).
#       podman build -t registry.example.com/ambit/ambit:0.1.0 .
#   ROOTFS=prebuilt (what `cargo xtask image` does; the only way on machines without a
#     registry, where no base image can be pulled): the host compiled the binaries with its
#     pinned toolchains and assembled the root filesystem in <context>/rootfs; no base image
#     is needed.
#       cargo xtask image --rootfs-only <context>/rootfs
#       podman build --build-arg ROOTFS=prebuilt -f Dockerfile <context>
#
# The build stage is skipped unless ROOTFS=source (podman/buildah and BuildKit build only the
# stages the final one needs).

ARG BUILDER=docker.io/library/rust:1.95-bookworm
ARG ROOTFS=source

FROM ${BUILDER} AS build
# The nightly the eBPF programs are built with (`-Z build-std=core`), the one bpf-linker is
# linked against: rustc 1.97.0-nightly (e50aa6fba 2026-05-19), LLVM 22. The build calls it
# `nightly`, hence the link.
ARG NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && ln -s "${NIGHTLY}-${host}" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/nightly-${host}"
WORKDIR /src
COPY . .
RUN cargo xtask image --rootfs-only /rootfs

FROM scratch AS source
COPY --from=build /rootfs/ /

FROM scratch AS prebuilt
COPY rootfs/ /

FROM ${ROOTFS}
ARG VERSION=0.1.0
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title="ambit" \
      org.opencontainers.image.description="Ambit, a sidecarless service mesh with socket-layer eBPF: agent, CA, waypoint, CLI and CNI plugin" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENTRYPOINT ["/usr/local/bin/ambit"]
CMD ["--help"]
