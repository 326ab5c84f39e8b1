"""The server: OpenAI-compatible routes plus the Gradio playground at `/`, over one engine."""
