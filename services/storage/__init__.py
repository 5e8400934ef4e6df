"""The storage service: datasets and artifacts in S3/MinIO with tenant-key envelope encryption."""
