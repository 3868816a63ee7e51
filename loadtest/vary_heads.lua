-- wrk script for `bench_throughput --vary-heads`: every request carries a field whose value
-- changes (a sequence number), so no two heads on a connection are the same bytes. This
-- measures the parsed path, as traffic whose fields vary request to request (cookies, referers,
-- trace ids) takes it.
local n = 0

request = function()
   n = n + 1
   return wrk.format(nil, nil, { ["X-Request-Seq"] = tostring(n) })
end
