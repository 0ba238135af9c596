"""The HTTP server (FastAPI app factory, metrics) and the RunPod endpoint emulation."""
