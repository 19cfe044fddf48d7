-- Take the parked deliveries that are due (members "{delivery id}:{attempt}").
-- KEYS: 1 parked zset; ARGV: 1 now ms, 2 at most
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
