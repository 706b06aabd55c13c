"""Where models come from: URIs (pure parsing), download (`forkless-runtime fetch`), and the model
file a directory holds. Nothing here imports torch; the fetch runs in an init container."""
