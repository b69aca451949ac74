-- wrk script: a non-streaming OpenAI chat completion request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer client-side-key-is-dropped"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello in one short sentence, please."}],"temperature":0.2}'
