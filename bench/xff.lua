-- wrk script: every request comes "through a trusted proxy" for a different client, so the
-- router does one mmdb lookup and one decision per request, as in production.
math.randomseed(7)
request = function()
  local ip = math.random(1, 223) .. "." .. math.random(0, 255) .. "." ..
             math.random(0, 255) .. "." .. math.random(1, 254)
  return wrk.format("GET", nil, { ["X-Forwarded-For"] = ip })
end
