-- Take a slot on a provider key for job ARGV[1] if fewer jobs wait ahead of it than slots are free,
-- else join the key's line.
--
-- The line is ordered by priority, then by a fair-share tag (start-time fair queuing per priority):
-- a tenant's next waiting job starts one turn after its previous one, never before the line's virtual
-- time (the tag of the last waiting job that took a slot). So tenants waiting on one key take turns:
-- one tenant's 5,000 queued jobs hold back another tenant's job by about one turn, not 5,000. Within
-- a tag, arrival order. A job keeps its place (its score) once it is in the line.
-- Score = rank * 1e13 + tag * 1e6 + arrival (mod 1e6). Tags restart when the line is empty.
--
-- KEYS: 1 inflight set, 2 waiting line, 3 fair-share tags (hash: vt:<rank>, t:<rank>:<tenant>, seq)
-- ARGV: 1 job id, 2 cap, 3 priority rank, 4 tenant. Returns 1 when taken.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local rank = tonumber(ARGV[3])
local base = rank * 1e13
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
local queued = score ~= false
local tag
if queued then
  score = tonumber(score)
  tag = math.floor((score - base) / 1e6)
else
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt:' .. rank) or '0')
  local ft = tonumber(redis.call('HGET', KEYS[3], 't:' .. rank .. ':' .. ARGV[4]) or '0')
  tag = math.max(vt, ft)
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1) % 1000000
  score = base + tag * 1e6 + seq
end
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free > 0 then
  local ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. string.format('%.0f', score))
  if ahead < free then
    redis.call('SADD', KEYS[1], ARGV[1])
    if queued then
      redis.call('ZREM', KEYS[2], ARGV[1])
      local vt = tonumber(redis.call('HGET', KEYS[3], 'vt:' .. rank) or '0')
      if tag > vt then redis.call('HSET', KEYS[3], 'vt:' .. rank, tag) end
    end
    return 1
  end
end
if not queued then
  redis.call('HSET', KEYS[3], 't:' .. rank .. ':' .. ARGV[4], tag + 1)
  redis.call('ZADD', KEYS[2], 'NX', string.format('%.0f', score), ARGV[1])
end
return 0
