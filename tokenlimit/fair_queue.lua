-- The gateways' shared fair queue for one upstream pool (tokenlimit/fair_queue.py).
-- KEYS: 1 in-flight (zset rid -> lease deadline), 2 waiting (zset rid -> finish tag),
--       3 state (hash: "vt" virtual time, "u:<user>" the user's last finish tag,
--                "c:<rid>" the waiting request's cost/weight, "o:<rid>" its user,
--                "n:<user>" the places the user holds),
--       4 waiting leases (zset rid -> deadline: renewed by every poll of a live waiter),
--       5 users seen (zset user -> when it last asked for a place)
-- Waiting members are scored by the request's priority (negated: higher first, as SGLang's
-- default) and named "<finish tag, fixed width>:<arrival sequence>:<rid>" (state "m:<rid>"
-- names it): a sorted set orders equal scores by member, so within a priority the lowest
-- finish tag goes first, and equal tags in arrival order.
-- ARGV: op, rid, user, cost/weight, capacity, now, lease, max waiting, waiting lease,
--       places kept from one user for others at most, how far ahead a waiter looks (bounded
--       work a poll), priority, how long a user counts as seen
-- Returns {granted (1|0 waiting|3 waiting, its user at its cap|-1 refused|-2 gone),
--          requests that go first, in flight}.
local op, rid, user = ARGV[1], ARGV[2], ARGV[3]
local share, capacity = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, lease, max_waiting = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local wait_lease, reserve = tonumber(ARGV[9]), tonumber(ARGV[10])
local scan_limit, priority = tonumber(ARGV[11]), tonumber(ARGV[12])
local seen_for = tonumber(ARGV[13])
local RID_AT = 38  -- after "<20-character tag>:<15-digit sequence>:"

-- A place given back (or its lease run out): its user holds one fewer.
local function free_place(held)
  if redis.call('ZREM', KEYS[1], held) == 1 then
    local owner = redis.call('HGET', KEYS[3], 'o:' .. held)
    if owner and redis.call('HINCRBY', KEYS[3], 'n:' .. owner, -1) <= 0 then
      redis.call('HDEL', KEYS[3], 'n:' .. owner)
    end
  end
end

local function drop_waiting(waiter)
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[3], 'm:' .. waiter) or '')
  redis.call('ZREM', KEYS[4], waiter)
  redis.call('HDEL', KEYS[3], 'c:' .. waiter, 'm:' .. waiter)
end

-- Leases of gateways that died run out here: a place held, or a place in the queue (a dead
-- waiter at the head would otherwise hold back everyone behind it).
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  free_place(dead)
  redis.call('HDEL', KEYS[3], 'o:' .. dead)
end
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  drop_waiting(dead)
  redis.call('HDEL', KEYS[3], 'o:' .. dead)
end

if op == 'leave' then
  free_place(rid)
  drop_waiting(rid)
  redis.call('HDEL', KEYS[3], 'o:' .. rid)
  return {0, 0, redis.call('ZCARD', KEYS[1])}
end

if op == 'enqueue' then
  redis.call('ZADD', KEYS[5], now, user)
  if redis.call('ZCARD', KEYS[2]) >= max_waiting then
    return {-1, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1])}
  end
  -- Weighted fair queueing: a request starts at the later of the virtual time and its user's
  -- last finish, and finishes cost/weight later. Lower finish tags go first.
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt') or '0')
  local last = tonumber(redis.call('HGET', KEYS[3], 'u:' .. user) or '0')
  local finish = math.max(vt, last) + share
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  local member = string.format('%020.6f:%015d:%s', finish, seq, rid)
  redis.call('HSET', KEYS[3], 'u:' .. user, finish, 'c:' .. rid, share, 'm:' .. rid, member,
             'o:' .. rid, user)
  redis.call('ZADD', KEYS[2], -priority, member)
end

local member = redis.call('HGET', KEYS[3], 'm:' .. rid)
local rank = member and redis.call('ZRANK', KEYS[2], member)
local running = redis.call('ZCARD', KEYS[1])
if not rank then
  if redis.call('ZSCORE', KEYS[1], rid) then
    return {1, 0, running}
  end
  return {-2, 0, running}
end
local function held(who)
  return tonumber(redis.call('HGET', KEYS[3], 'n:' .. who) or '0')
end

-- One user holds at most the pool less a place for each other user seen lately (at least one,
-- at most `reserve`): room for the users who are here, not for an eighth of the pool idle.
local user_cap = capacity
if reserve > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - seen_for)
  local others = redis.call('ZCARD', KEYS[5])
  if redis.call('ZSCORE', KEYS[5], user) then
    others = others - 1
  end
  user_cap = math.max(capacity - math.min(reserve, math.max(others, 1)), 1)
end

-- Where this request stands: whether its user holds its cap (it waits for one of its own places
-- whatever the queue does), else how many requests ahead of it would take a place first: those
-- whose user is below the cap, counting what each takes (past scan_limit: its rank).
local function standing()
  if held(user) >= user_cap then
    return true, rank
  end
  if rank > scan_limit then
    return false, rank
  end
  local served, taking = 0, {}
  if rank > 0 then
    for _, other in ipairs(redis.call('ZRANGE', KEYS[2], 0, rank - 1)) do
      local who = redis.call('HGET', KEYS[3], 'o:' .. string.sub(other, RID_AT)) or ''
      if taking[who] == nil then
        taking[who] = held(who)
      end
      if taking[who] < user_cap then
        taking[who] = taking[who] + 1
        served = served + 1
      end
    end
  end
  return false, served
end

local capped, ahead = standing()
if not capped and rank <= scan_limit and ahead < capacity - running then
  redis.call('ZREM', KEYS[4], rid)
  local finish = tonumber(string.sub(member, 1, 20))
  local cost = tonumber(redis.call('HGET', KEYS[3], 'c:' .. rid) or '0')
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[3], 'c:' .. rid, 'm:' .. rid)
  redis.call('ZADD', KEYS[1], now + lease, rid)
  redis.call('HINCRBY', KEYS[3], 'n:' .. user, 1)
  -- The virtual time advances to the start tag of what is served (start-time fair queueing).
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt') or '0')
  redis.call('HSET', KEYS[3], 'vt', math.max(vt, finish - cost))
  return {1, 0, running + 1}
end
redis.call('ZADD', KEYS[4], now + wait_lease, rid)
return {capped and 3 or 0, ahead, running}
