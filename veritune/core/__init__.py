"""What every stage shares: params.yaml read into checked dataclasses, artifact I/O that never
leaves a half-written file, and the chat formats (Llama 3.1 and ChatML, tool calling)."""
