"""The HTTP edge: Klein routes (parse -> service -> encode), SSE, WebSocket, OpenAI route, auth."""
