# syntax=docker/dockerfile:1
# loraplane's two images, the ones the Helm chart runs (charts/loraplane/values.yaml: image.*):
#   docker build --target server   -t ghcr.io/loraplane/loraplane-server:0.1.0 .
#   docker build --target operator -t ghcr.io/loraplane/loraplane-operator:0.1.0 .
# NB: not built in this repository's CI (its machines have no Docker engine).

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p loraplane-server -p loraplane-operator \
      --bin loraplane-server --bin loraplane-operator

# The server loads libcuda (the driver's, mounted by the NVIDIA container toolkit), libnvrtc and
# libcublas at run time, and NVRTC compiles the kernels against the CUDA headers: the runtime
# image carries the libraries, the headers come from the devel image. On the CPU (--device cpu)
# none of them is loaded.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS cuda-headers

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS server
COPY --from=cuda-headers /usr/local/cuda/include /usr/local/cuda/include
COPY --from=build /src/target/release/loraplane-server /usr/local/bin/loraplane-server
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64 XDG_CACHE_HOME=/tmp/cache
USER 65532:65532
EXPOSE 30000
ENTRYPOINT ["/usr/local/bin/loraplane-server"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/loraplane-operator /usr/local/bin/loraplane-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/loraplane-operator"]
