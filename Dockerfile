# The studio alone, without models or Triton: a Gradio app on port 7860 in front of a SageMaker
# endpoint. What a Hugging Face Docker Space builds (see docs/studio.md).
#
#   docker build -t sd-studio .
#   docker run -p 7860:7860 -e STUDIO_ENDPOINT_NAME=sd-studio -e AWS_REGION=us-east-1 \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       -v $PWD/users.txt:/run/users.txt:ro -e STUDIO_USERS_FILE=/run/users.txt sd-studio
#
# Listening beyond 127.0.0.1, the studio starts only with a sign-in: a users file as above, or a
# Space with `hf_oauth: true` (see docs/security.md).
#
# The base image is pinned by digest, so every build starts from the same bytes (Docker uses the
# digest and ignores the tag, which stays for people). The digest is the one Docker Hub's
# python:3.11-slim resolved to on 2025-06-11, as BuildKit recorded it in a build log
# committed to the public GitHub repository amany-gaber/just (file errror.py: "resolve
# docker.io/library/python:3.11-slim@sha256:74132ced..."). To move to a newer build of the tag,
# take the "Digest:" of `docker buildx imagetools inspect python:3.11-slim` and rebuild.
FROM python:3.11-slim@sha256:74132ced0002947303bc75654c7d51d3818435fe1c0ec6e4d84f7ca4d0849878

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

# Spaces run the container as uid 1000; results are kept in its home (~/.cache/sd-studio).
RUN useradd --create-home --uid 1000 studio
WORKDIR /app

# Only what the lock names, each file checked against its sha256 (`make studio-lock` writes the
# lock from studio/requirements.txt), and only wheels: no source build runs unchecked code.
COPY studio/requirements.lock studio/requirements.lock
RUN pip install --require-hashes --only-binary=:all: -r studio/requirements.lock

COPY studio/ studio/
# The model table the studio derives its tabs from (standard library only; the modules that
# need torch are never imported here).
COPY serving/sdserve/ sdserve/
COPY assets/ assets/

USER studio
EXPOSE 7860
# 0.0.0.0 inside a container, so the published port reaches it; elsewhere the studio listens on
# 127.0.0.1 unless told otherwise.
CMD ["python", "-m", "studio", "--host", "0.0.0.0", "--port", "7860"]
