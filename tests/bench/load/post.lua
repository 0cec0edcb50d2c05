-- wrk script: POST the body in $LOAD_BODY, with $LOAD_AUTH as the Authorization header if set.
wrk.method = "POST"
wrk.body = os.getenv("LOAD_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("LOAD_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end
