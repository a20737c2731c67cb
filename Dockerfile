# The studio alone, without models or Triton: a Gradio app on port 7860 in front of a SageMaker
# endpoint. What a Hugging Face Docker Space builds (see the README).
#
#   docker build -t sd-studio .
#   docker run -p 7860:7860 -e STUDIO_ENDPOINT_NAME=sd-studio -e AWS_REGION=us-east-1 \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY sd-studio
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False

# Spaces run the container as uid 1000; results are kept in its home (~/.cache/sd-studio).
RUN useradd --create-home --uid 1000 studio
WORKDIR /app

COPY studio/requirements.txt studio/requirements.txt
RUN pip install -r studio/requirements.txt

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
